"""The task side: where a rank's process is prepared and started (a Spark barrier task or a driver process)."""
