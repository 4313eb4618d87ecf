"""The batch path: read (source), generate (worker), commit (store), drive and report (job, progress)."""
