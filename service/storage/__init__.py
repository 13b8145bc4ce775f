"""Redis storage: key names, checkpoints, session records, the transition log, memory, library."""
