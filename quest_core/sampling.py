"""Next-token choice from logits: greedy, or temperature with nucleus (top-p) sampling."""
import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits [vocab] float32 -> token id, a 0-d long tensor (stays on the logits' device: no host sync)."""
    if temperature <= 0:
        return logits.argmax()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]
