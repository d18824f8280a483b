"""Download stage: the OpenScene release manifest, resumable mirrored downloads with checksums, safe
extraction and the completeness check of an extracted split.

Modules: :mod:`.release` (manifest as data, ``release.json``), :mod:`.fetch` (HTTP with Range resume,
retries, parallel), :mod:`.checksums` (md5sum files, streaming hashes), :mod:`.extract` (safe,
all-or-nothing extraction), :mod:`.state` (records under ``<out>/.driveengine``), :mod:`.download`
(the ``download`` command), :mod:`.verify` (the ``verify`` command).
"""
