"""The local full stack: every server of the reference's docker-compose, without Docker."""
