"""The experiment configs, read by path by the binaries (--config=configs/<file>.py:<arg>; a clone
links configs/ here). May import: training, ops; nothing in the package imports them."""
