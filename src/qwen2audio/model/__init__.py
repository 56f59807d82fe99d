"""The network: audio encoder, projector and Qwen2 decoder, its op backend, and strict checkpoint loading."""
