"""A store in process memory: nothing survives the process, so every start recovers the whole
changelog partition."""
