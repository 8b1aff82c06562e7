"""Static mixers: their weights never change during training."""
import torch

from fastmix.mixing.base import Mixer, check_number, register_mixer


class StaticMixer(Mixer):
    """Fixed weights; `update` does nothing. Base of Uniform and Temperature."""

    def __init__(self, weights):
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        self._weights = w / w.sum()

    @property
    def weights(self):
        return self._weights.clone()

    def update(self, ctx):
        pass

    def state_dict(self):
        return {"weights": self._weights.clone()}

    def load_state_dict(self, state):
        if len(state["weights"]) != len(self._weights):
            raise ValueError(f"{type(self).__name__} state is for {len(state['weights'])} domains, but the store has "
                             f"{len(self._weights)} (only the chameleon mixer takes domains added since the checkpoint)")
        # the loop maps checkpoints to the training device; the weights stay a float64 CPU tensor
        self._weights = state["weights"].to(torch.float64).cpu().clone()


class Uniform(StaticMixer):
    """Every domain weighs 1/k."""

    def __init__(self, num_domains):
        super().__init__(torch.ones(num_domains))


class Temperature(StaticMixer):
    """Natural token proportions to the power 1/T: T=1 samples by size, T→∞ is uniform."""

    def __init__(self, token_counts, temperature=2.0):
        self.temperature = check_number("temperature", temperature, 0, low_open=True)
        counts = torch.as_tensor(token_counts, dtype=torch.float64)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or not float(counts.sum()) > 0:
            raise ValueError(f"token counts must be finite, non-negative and not all zero, got {counts.tolist()}")
        # p^(1/T) normalised, as a softmax of log(p) / T: finite whatever T > 0 (a tiny T would
        # underflow p^(1/T) to 0 for every domain; here it tends to all weight on the largest)
        super().__init__(torch.softmax(torch.log(counts / counts.sum()) / self.temperature, 0))


register_mixer("uniform", lambda store, **options: Uniform(store.num_domains, **options), options_of=Uniform)
register_mixer("temperature", lambda store, **options: Temperature(store.train_tokens, **options), options_of=Temperature)
