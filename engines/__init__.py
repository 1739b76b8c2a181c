"""The editor (Mobile-Pix2Pix + TAESD + guidance embeddings), its backends and the batching worker."""
