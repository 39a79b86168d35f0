"""The ``qig_*`` settings of QIG attribution, validated together.

Every QIG modifier inherits these fields (they are its recipe keys); ``qig explain`` and the
benchmarks build a :class:`QIGSettings` of their own, or take one from a recipe's modifier with
:func:`settings_of`. Pure pydantic: nothing here knows about llm-compressor.
"""

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from qig_plugin.attribution.integrated_gradients import QuadratureRule

__all__ = ["QIGSettings", "settings_of"]


class QIGSettings(BaseModel):
    """How QIG attributes a block's quantization discrepancy to its input tokens.

    :param qig_attribution: ``"exact"``: integrated gradients as the paper defines them, every block
        integrated with the node ladder below. ``"fast"``: the same scores where they are cheap, and
        their forward-only equivalent where tokens do not interact: a block whose output at a token
        depends on that token's input alone (an MLP, a single linear; found by probing the block once)
        gets each token's discrepancy ``|F(x_t) - F(x0_t)|``, ``F = mean_h |f(x; W) - f(x; Q(W))|``,
        which completeness makes the sum of that token's integrated gradients: two forwards instead of
        forwards and backwards at every node. Attention, where tokens interact, keeps integrated
        gradients, by the path's midpoint (one Gauss-Legendre node) and no completeness check. The
        node settings below apply to ``exact``.
    :param qig_steps: the most quadrature nodes of the path integral for attention/MLP
        blocks (``exact``). 6 Gauss-Legendre nodes keep completeness within 0.1% and the token
        ranking at Spearman >= 0.9996 of a 256-node reference on the default model's
        blocks (benchmarks/attribution_fidelity.py); the reference release's 32 uniform
        points are off by up to 3.8%. Single-linear blocks with a zero baseline take
        none: their objective is positively homogeneous of degree 1, so ``x * grad`` at
        ``x`` is exact, in closed form.
    :param qig_min_steps: nodes tried first (at most ``qig_steps``); the result is kept when
        its completeness error is within ``qig_completeness_tol``, else the block is
        retaken with half again as many nodes (2, 3, 4, 6) up to ``qig_steps``. Each block
        starts from the count that last passed (MLPs pass with 2 nodes, most attention
        blocks with 3), and once a count has passed on 2 batches in a row the block keeps
        it without the check
    :param qig_completeness_tol: accepted relative completeness error
        ``|sum IG - (F(x) - F(x0))| / |F(x) - F(x0)|`` of a result with fewer than ``qig_steps`` nodes
    :param qig_rule: ``"gauss_legendre"`` (default) or ``"uniform"`` (the reference's
        mean over ``linspace(0, 1, steps)``)
    :param qig_iqr_clip: clip each sample's weights to ``[Q1 - k IQR, Q3 + k IQR]``
    :param qig_iqr_k: the IQR multiplier ``k``
    :param qig_mask_padding: give weight 0 to padding (keys a token cannot attend to
        itself in the attention mask) and to tokens whose ``loss_mask`` is 0 when
        ``oneshot(..., use_loss_mask=True)``
    :param qig_points_per_pass: path points evaluated together in one block pass
        (None: all nodes at once, the fastest; set it to bound memory on long sequences)
    """

    qig_attribution: Literal["fast", "exact"] = "fast"
    qig_steps: int = Field(default=6, ge=1)
    qig_min_steps: int = Field(default=2, ge=1)
    qig_completeness_tol: float = Field(default=0.01, ge=0)
    qig_rule: QuadratureRule = "gauss_legendre"
    qig_iqr_clip: bool = True
    qig_iqr_k: float = Field(default=1.5, ge=0)
    qig_mask_padding: bool = True
    qig_points_per_pass: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _min_steps_within_steps(self):
        if self.qig_min_steps > self.qig_steps:
            raise ValueError(
                f"qig_min_steps ({self.qig_min_steps}) exceeds qig_steps ({self.qig_steps}): the node ladder "
                f"starts at qig_min_steps and stops at qig_steps; lower qig_min_steps or raise qig_steps"
            )
        return self

    @property
    def iqr_multiplier(self) -> float | None:
        """The IQR clipping multiplier, None when clipping is off."""
        return self.qig_iqr_k if self.qig_iqr_clip else None


def settings_of(modifier: object) -> QIGSettings:
    """The QIG settings of a recipe's modifier: its own ``qig_*`` fields, or the defaults for a stock modifier."""
    if isinstance(modifier, QIGSettings):
        return QIGSettings(**{name: getattr(modifier, name) for name in QIGSettings.model_fields})
    return QIGSettings()
