"""Training recipes that produce weights the engines/ package loads."""
