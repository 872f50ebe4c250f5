"""One module per method: losses as plain functions of tensors and modules, plus a
``train``-style function that wires them to :func:`osdlib.train.train`. A method knows
nothing about notebooks, files or profiles."""
