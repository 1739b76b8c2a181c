"""WebRTC load generator for StreamEdit: a client of the public API only."""
