"""The remote monitor (outside the cloud): heartbeats to the IDS, its sealed findings, metrics."""
