"""A DiT4SR smaller than the shipped tiny model, with random weights, and inputs for it."""
import torch

from qdit4sr.models.config import TINY_CONFIG

# Smaller than the shipped tiny model so that every test stays fast; same block structure
# (dual attention first, plain joint attention, the context_pre_only last block).
MICRO_CONFIG = {**TINY_CONFIG, "num_layers": 3, "dual_attention_layers": [0], "num_attention_heads": 2,
                "attention_head_dim": 32, "caption_projection_dim": 64, "pos_embed_max_size": 16}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Random non-zero weights everywhere (the control layers are zero-initialised in real training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if name.endswith("norm_q.weight")
                                                                   or "norm_k" in name or "norm_added" in name
                                                                   else 0.0))
    return model


def micro_inputs(config: dict, batch: int = 2, size: int = 8, tokens: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    c = config["in_channels"]
    return (torch.randn(batch, c, size, size, generator=gen), torch.randn(batch, c, size, size, generator=gen),
            torch.randn(batch, tokens, config["joint_attention_dim"], generator=gen),
            torch.randn(batch, config["pooled_projection_dim"], generator=gen),
            torch.tensor([900.0, 250.0][:batch]))
