"""The network: audio encoder, projector and Qwen2 decoder, and strict checkpoint loading."""
