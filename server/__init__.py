"""The StreamEdit HTTP/WebRTC service: signaling, sessions, control plane and metrics; it owns no model code."""
