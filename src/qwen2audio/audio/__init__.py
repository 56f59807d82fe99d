"""Audio at the edge: decoding (io) and log-mel features (features). Import the module you need: the
engine uses the features without pulling in the decoders."""
