"""The core every other package stands on: settings, the models, image decoding, file reading
and the wire format. It imports nothing of ``producer/``, ``worker/`` or ``db/``."""
