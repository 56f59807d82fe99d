"""Exploratory (issue 18, branch): logits of the mid-size random checkpoint with every decoder linear
replaced after loading by a QuantizedLinear, against float32. Not the final accuracy test."""
import sys, pathlib, tempfile, torch, numpy as np
sys.path.insert(0, '/work/main/tests')
from checkpoints import build_checkpoint
from qwen2audio.api import Qwen2Audio
from qwen2audio.model.quant import QuantizedLinear, QuantConfig
TEXT = {"vocab_size": 32000, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 8,
        "num_attention_heads": 14, "num_key_value_heads": 2}
AUDIO = {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536}
d = build_checkpoint(pathlib.Path(tempfile.mkdtemp()) / "mid", text_dims=TEXT, audio_dims=AUDIO, randomize=False)
from qwen2audio.engine.options import EngineOptions
base = Qwen2Audio.from_pretrained(d, progress=False, engine_options=EngineOptions(cpu_onednn=False))
rng = np.random.default_rng(0)
convs = [[{"role": "user", "content": [{"type": "audio", "audio": (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32)},
                                       {"type": "text", "text": f"What is in clip {k}?"}]}] for k in range(4)]
batch = base.processor(convs)
ref = base.logits(batch)
mask = batch.attention_mask.bool()
for cfg in [QuantConfig("int8"), QuantConfig("int4", 32), QuantConfig("int4", 128)]:
    model = Qwen2Audio.from_pretrained(d, progress=False, engine_options=EngineOptions(cpu_onednn=False))
    dec = model.network.language_model
    n = 0
    for layer in dec.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, QuantizedLinear.from_float(child, cfg, dtype=torch.float32)); n += 1
    got = model.logits(batch)
    rel = ((got[mask] - ref[mask]).abs().max() / ref[mask].abs().max()).item()
    l2 = ((got[mask] - ref[mask]).norm() / ref[mask].norm()).item()
    agree = (got[mask].argmax(-1) == ref[mask].argmax(-1)).float().mean().item()
    print(cfg.scheme, cfg.group_size, n, 'layers; max rel', round(rel, 4), 'L2 rel', round(l2, 4), 'argmax agree', round(agree, 3))
