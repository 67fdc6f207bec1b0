"""The engine: what runs a model block by block, independent of any method.

``prune`` (the sequential loop: capture, compress, propagate), ``forward`` (every
block-by-block pass: capture, propagate, loss, fitness), ``gradients`` (the loss
back-propagated one block at a time), ``store`` (the model in memory or streamed from
its checkpoint), ``stats`` (per-layer calibration statistics), ``adapters`` (where a
model's blocks and linear layers live), ``experts`` (mixture-of-experts weights as
layers), ``device`` (device, dtype, peak memory) and ``heap`` (glibc heap settings).
"""
