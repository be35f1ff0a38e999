"""The command line: argument parsing, the console and the Spark session; thin."""
