"""Checkpoints on disk: finding and checking them (``checkpoint``), reading and writing
safetensors (``safetensors_io``), loading a model (``models``), output folders that
appear only when complete (``folders``), writing results (``export``) and the packed
sparse layout (``pack``).
"""
