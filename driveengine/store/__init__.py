"""The dataset on disk: manifest (commit point), per-log atomic commit, readers, legacy export."""
