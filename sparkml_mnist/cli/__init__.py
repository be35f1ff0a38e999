"""The command line: argument parsing, the console, the Spark session and runtime guardrails; thin."""
