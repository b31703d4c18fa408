"""Load generation and the test images it sends (no third-party data: every image is made here)."""
