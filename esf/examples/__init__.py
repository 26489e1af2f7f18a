"""Small example programs built on esf."""
