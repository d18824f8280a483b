"""DriveEngine: nuPlan/OpenScene driving data into training-ready frame shards and occupancy labels."""

__version__ = "0.2.0"
