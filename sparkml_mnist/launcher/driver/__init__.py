"""The driver side of a launch: pre-flight, one attempt's ranks, the watchdog, live board, checkpoint store."""
