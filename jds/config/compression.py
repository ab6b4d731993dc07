"""DeepSpeed's ``compression_training`` section, and MoQ's older ``quantize_training``.

The keys and defaults are DeepSpeed 0.16's (``deepspeed/compression/constants.py``).
Every technique is built (``jds.compression``): ``weight_quantization``
(quantization-aware training with MoQ's bit schedule), ``activation_quantization``, the four
pruning techniques and ``layer_reduction``.

``quantize_training`` (MoQ's own section: ``quantize_bits``, ``quantize_schedule``,
``quantize_groups``, ``quantize_algo``, ``fp16_mixed_quantize``, ``quantize_verbose``,
``quantizer_kernel``, ``eigenvalue``) is read as the ``weight_quantization`` it describes,
applied to every compressible module (``modules: ["*"]``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, create_model, model_validator

from jds.config.sections import Bool, Int, Num, _Section


class MixedQuantize(_Section):
    """``fp16_mixed_quantize``: the weight used is ``ratio * w + (1 - ratio) * q(w)``, the
    ratio falling by ``quantize_change_ratio`` per step from 1 (reset at each bit change)."""

    enabled: Bool = Field(False, description="Blend full-precision and quantized weights.")
    quantize_change_ratio: Num = Field(0.001, gt=0, le=1, description="Ratio drop per step.")


class WeightQuantShared(_Section):
    """``weight_quantization.shared_parameters``."""

    enabled: Bool = Field(False, description="Quantization-aware training of the weights.")
    quantizer_kernel: Bool = Field(False, description="DeepSpeed's CUDA quantizer; XLA fuses "
                                   "the quantizer into the step either way.")
    schedule_offset: Int = Field(0, ge=0, description="Steps before quantization starts.")
    quantize_groups: Int = Field(1, ge=1, description="Groups per matrix (rows split into "
                                 "this many runs, as DeepSpeed); must divide the row count.")
    quantize_verbose: Bool = Field(False, description="Log each bit-width change.")
    quantization_type: Literal["symmetric", "asymmetric"] = Field("symmetric")
    quantize_weight_in_forward: Bool = Field(
        False, description="Quantize at target_bits in the forward pass from schedule_offset "
        "(no bit schedule); false = MoQ (start_bits down to target_bits).")
    rounding: Literal["nearest", "stochastic"] = Field("nearest")
    fp16_mixed_quantize: MixedQuantize = Field(default_factory=MixedQuantize)


class WeightQuantParams(_Section):
    """A group's ``params``: MoQ starts at ``start_bits``, drops a bit after
    ``quantization_period`` quantized steps, then after twice as many, ..., down to
    ``target_bits`` (at most one bit per step: period 0, which DeepSpeedExamples' configs
    use with equal bits, drops one bit every step)."""

    start_bits: Int = Field(ge=1, le=32)
    target_bits: Int = Field(ge=1, le=32)
    quantization_period: Int = Field(1, ge=0)

    @model_validator(mode="after")
    def _bits(self) -> WeightQuantParams:
        if self.target_bits > self.start_bits:
            raise ValueError(f"target_bits ({self.target_bits}) is above start_bits "
                             f"({self.start_bits}); MoQ lowers the bit width, so set "
                             "target_bits <= start_bits")
        return self


class WeightQuantGroup(_Section):
    """A ``different_groups`` entry: ``modules`` are regexes searched in module names
    (DeepSpeed's ``re.search``; ``"*"`` = every compressible module)."""

    params: WeightQuantParams
    modules: list[str] = Field(default_factory=lambda: ["*"])
    related_modules: Any = None


class WeightQuantization(_Section):
    shared_parameters: WeightQuantShared = Field(default_factory=WeightQuantShared)
    different_groups: dict[str, WeightQuantGroup] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> WeightQuantization:
        s = self.shared_parameters
        if s.enabled and not self.different_groups:
            raise ValueError("weight_quantization is enabled but different_groups is empty; "
                             "add a group with params (start_bits, target_bits) and modules")
        for name, g in self.different_groups.items():
            if g.params.target_bits <= 2 and (s.quantization_type != "symmetric"
                                              or s.rounding != "nearest"):
                raise ValueError(f"different_groups.{name}: target_bits "
                                 f"{g.params.target_bits} is ternary/binary quantization, "
                                 "which DeepSpeed defines for quantization_type 'symmetric' "
                                 "with rounding 'nearest' only")
        return self


class PruningShared(_Section):
    """A pruning technique's ``shared_parameters`` (DeepSpeed 0.16's keys and defaults).

    ``method``: ``"l1"`` (the mask is computed once, when training starts, from the
    weights' magnitudes: per element for sparse pruning, per row / channel by its L1 norm)
    or ``"topk"`` (a learned score per element / row / head / channel; the mask keeps the
    top ``dense_ratio`` share, and the scores train through a straight-through estimator).
    The mask applies in the forward pass from step ``schedule_offset`` on.
    """

    enabled: Bool = Field(False, description="Apply this pruning technique.")
    method: str = Field("l1", description="'l1' (fixed magnitude mask) or 'topk' (learned "
                        "scores).")
    schedule_offset: Int = Field(1000, ge=0, description="Optimizer steps before the mask "
                                 "applies.")

    _METHODS: ClassVar[tuple[str, ...]] = ("l1", "topk")

    @model_validator(mode="after")
    def _method(self) -> PruningShared:
        if self.method not in self._METHODS:
            raise ValueError(f"method {self.method!r} is not one of {list(self._METHODS)}")
        return self


class SparsePruningShared(PruningShared):
    """``sparse_pruning.shared_parameters``; ``snip_momentum`` (Intel Neural Compressor's
    pruner in DeepSpeed) is refused: jds does not depend on that package."""

    schedule_offset_end: Int | None = Field(None, ge=0, description="snip_momentum's end "
                                            "step; for l1/topk DeepSpeed never turns the mask "
                                            "off again, nor does jds.")
    schedule_offset_stride: Int = Field(1, ge=1, description="snip_momentum only.")
    block_pattern: str = Field("4x1", description="snip_momentum only.")
    dense_ratio: Num | None = Field(None, description="snip_momentum only (groups carry it "
                                    "for l1/topk).")
    excluded_modules: list[str] = Field(default_factory=list, description="snip_momentum only.")

    @model_validator(mode="after")
    def _method(self) -> SparsePruningShared:
        if self.method == "snip_momentum":
            raise ValueError("method 'snip_momentum' runs Intel Neural Compressor's pruner in "
                             "DeepSpeed, which jds does not depend on; use 'l1' or 'topk'")
        if self.method not in self._METHODS:
            raise ValueError(f"method {self.method!r} is not one of "
                             f"{list(self._METHODS) + ['snip_momentum']}")
        if self.schedule_offset_end is not None and (
                self.schedule_offset_end < self.schedule_offset):
            raise ValueError(f"schedule_offset_end ({self.schedule_offset_end}) is before "
                             f"schedule_offset ({self.schedule_offset})")
        return self


class HeadPruningShared(PruningShared):
    """``head_pruning.shared_parameters``: the attention output matrix's inputs are split
    into ``num_heads`` runs and a learned score per run keeps the top ``dense_ratio``."""

    method: str = Field("topk", description="'topk' (DeepSpeed defines head pruning by "
                        "learned scores only).")
    num_heads: Int | None = Field(None, ge=1, description="Heads of the pruned matrices' "
                                  "inputs.")

    @model_validator(mode="after")
    def _method(self) -> HeadPruningShared:
        if self.method != "topk":
            raise ValueError(f"method {self.method!r}: DeepSpeed's head pruning learns a score "
                             "per head ('topk'); 'l1' is accepted by its config parser but "
                             "raises NotImplementedError when applied. Use 'topk'")
        if self.enabled and self.num_heads is None:
            raise ValueError("num_heads must be given when head pruning is enabled")
        return self


class PruningParams(_Section):
    """A pruning group's ``params``."""

    dense_ratio: Num = Field(description="The share of weights / rows / heads / channels "
                             "kept, in (0, 1].")

    @model_validator(mode="after")
    def _ratio(self) -> PruningParams:
        if not 0 < self.dense_ratio <= 1:
            raise ValueError(f"dense_ratio {self.dense_ratio} is outside (0, 1]: it is the "
                             "share kept")
        return self


class PruningGroup(_Section):
    """A pruning ``different_groups`` entry. ``related_modules`` (row, head and channel
    pruning): for each ``modules`` pattern, a list of patterns whose modules consume the
    pruned outputs (row: the next Linear's input columns; head: the q/k/v matrices' output
    heads; channel: the next Conv's input channels or a BatchNorm's channels), so that
    ``redundancy_clean`` removes them physically; without it the pruned weights are zeroed
    in place."""

    params: PruningParams
    modules: list[str] = Field(default_factory=lambda: ["*"])
    related_modules: list[list[str]] | None = None

    @model_validator(mode="after")
    def _related(self) -> PruningGroup:
        if self.related_modules is not None and len(self.related_modules) != len(self.modules):
            raise ValueError(f"related_modules has {len(self.related_modules)} lists for "
                             f"{len(self.modules)} modules patterns; give one list per pattern")
        return self


def _pruning_section(shared_cls: type[PruningShared], name: str) -> type[_Section]:
    def check(self):
        if self.shared_parameters.enabled and not self.different_groups:
            raise ValueError(f"{name} is enabled but different_groups is empty; add a group "
                             "with params.dense_ratio and modules")
        return self

    return create_model(
        name.title().replace("_", ""), __base__=_Section,
        shared_parameters=(shared_cls, Field(default_factory=shared_cls)),
        different_groups=(dict[str, PruningGroup], Field(default_factory=dict)),
        __validators__={"_check": model_validator(mode="after")(check)})


SparsePruning = _pruning_section(SparsePruningShared, "sparse_pruning")
RowPruning = _pruning_section(PruningShared, "row_pruning")
HeadPruning = _pruning_section(HeadPruningShared, "head_pruning")
ChannelPruning = _pruning_section(PruningShared, "channel_pruning")
PRUNING = ("sparse_pruning", "row_pruning", "head_pruning", "channel_pruning")

class LayerReduction(_Section):
    """``layer_reduction``: a student with ``keep_number_layer`` layers initialised from the
    teacher's ``teacher_layer`` layers (``jds.compression.init_compression(student, config,
    teacher_model=teacher)``; the engine itself ignores the section, as DeepSpeed's does)."""

    enabled: Bool = Field(False, description="Initialise the student from teacher layers.")
    keep_number_layer: Int | None = Field(None, ge=1, description="The student's layers.")
    module_name_prefix: str = Field("", description="The layers' module name before the "
                                    "index (model.layers, transformer.h, or an attribute path).")
    teacher_layer: list[Int] = Field(default_factory=list, description="The teacher layer "
                                     "copied into each student layer.")
    other_module_name: list[str] = Field(default_factory=list, description="Modules copied "
                                         "whole (embeddings, final norm, head).")

    @model_validator(mode="after")
    def _check(self) -> LayerReduction:
        if not self.enabled:
            return self
        if self.keep_number_layer is None or not self.module_name_prefix:
            raise ValueError("layer_reduction needs keep_number_layer and module_name_prefix")
        if len(self.teacher_layer) != self.keep_number_layer:
            raise ValueError(f"teacher_layer has {len(self.teacher_layer)} entries for "
                             f"keep_number_layer {self.keep_number_layer}; give one teacher "
                             "layer per student layer")
        return self


class ActivationQuantShared(_Section):
    """``activation_quantization.shared_parameters``."""

    enabled: Bool = Field(False, description="Fake-quantize the inputs of the modules.")
    quantization_type: Literal["symmetric", "asymmetric"] = Field("symmetric")
    range_calibration: Literal["dynamic", "static"] = Field(
        "dynamic", description="'dynamic': a range per token (Linear) or sample (Conv); "
        "'static': one running range per module (momentum 0.95).")
    schedule_offset: Int = Field(1000, ge=0, description="Optimizer steps before the inputs "
                                 "are quantized.")


class ActivationQuantParams(_Section):
    bits: Int = Field(description="4 or 8 (DeepSpeed's two widths).")

    @model_validator(mode="after")
    def _bits(self) -> ActivationQuantParams:
        if self.bits not in (4, 8):
            raise ValueError(f"bits {self.bits}: DeepSpeed quantizes activations to 4 or 8 "
                             "bits")
        return self


class ActivationQuantGroup(_Section):
    params: ActivationQuantParams
    modules: list[str] = Field(default_factory=lambda: ["*"])
    related_modules: Any = None


class ActivationQuantization(_Section):
    shared_parameters: ActivationQuantShared = Field(default_factory=ActivationQuantShared)
    different_groups: dict[str, ActivationQuantGroup] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ActivationQuantization:
        if self.shared_parameters.enabled and not self.different_groups:
            raise ValueError("activation_quantization is enabled but different_groups is "
                             "empty; add a group with params.bits and modules")
        return self


class CompressionConfig(_Section):
    """``compression_training``."""

    weight_quantization: WeightQuantization = Field(default_factory=WeightQuantization)
    activation_quantization: ActivationQuantization = Field(
        default_factory=ActivationQuantization)
    sparse_pruning: SparsePruning = Field(default_factory=SparsePruning)
    row_pruning: RowPruning = Field(default_factory=RowPruning)
    head_pruning: HeadPruning = Field(default_factory=HeadPruning)
    channel_pruning: ChannelPruning = Field(default_factory=ChannelPruning)
    layer_reduction: LayerReduction = Field(default_factory=LayerReduction)

    @property
    def quantizes(self) -> bool:
        """Weight quantization is on."""
        return self.weight_quantization.shared_parameters.enabled

    @property
    def prunes(self) -> bool:
        """A pruning technique is on."""
        return any(getattr(self, k).shared_parameters.enabled for k in PRUNING)

    @property
    def quantizes_activations(self) -> bool:
        """Activation quantization is on."""
        return self.activation_quantization.shared_parameters.enabled

    @property
    def changes_model(self) -> bool:
        """The engine's copy of the model carries compression state (pruning masks and
        scores, activation quantizers)."""
        return self.prunes or self.quantizes_activations

    @property
    def enabled(self) -> bool:
        return self.quantizes or self.prunes or self.quantizes_activations


def from_quantize_training(section: dict[str, Any]) -> dict[str, Any] | None:
    """MoQ's ``quantize_training`` section as the ``compression_training`` it means, or
    None when it is off. Raises ValueError naming a key jds does not take."""
    if not isinstance(section, dict):
        raise ValueError("quantize_training must be a JSON object")
    if not section.get("enabled", False):
        return None
    known = {"enabled", "quantize_bits", "quantize_schedule", "quantize_groups", "quantize_algo",
             "fp16_mixed_quantize", "quantize_verbose", "quantizer_kernel", "eigenvalue"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"quantize_training.{unknown[0]} is not a MoQ key; the keys are "
                         f"{', '.join(sorted(known))}")
    if (section.get("eigenvalue") or {}).get("enabled", False):
        raise ValueError("quantize_training.eigenvalue is not built in jds (DeepSpeed 0.16 "
                         "disables it too: 'Eigenvalue based MoQ is temporarily disabled'); "
                         "set its enabled false")
    bits = section.get("quantize_bits", {})
    sched = section.get("quantize_schedule", {})
    algo = section.get("quantize_algo", {})
    mixed = section.get("fp16_mixed_quantize", {})
    q_type = algo.get("q_type", "symmetric")
    return {"weight_quantization": {
        "shared_parameters": {
            "enabled": True, "quantizer_kernel": section.get("quantizer_kernel", False),
            "schedule_offset": sched.get("schedule_offset", 0),
            "quantize_groups": section.get("quantize_groups", 1),
            "quantize_verbose": section.get("quantize_verbose", False),
            "quantization_type": q_type,
            "rounding": algo.get("rounding", "nearest"),
            "fp16_mixed_quantize": {
                "enabled": mixed.get("enabled", False),
                "quantize_change_ratio": mixed.get("quantize_change_ratio", 0.001)}},
        "different_groups": {"moq": {
            "params": {"start_bits": bits.get("start_bits", 16),
                       "target_bits": bits.get("target_bits", 8),
                       "quantization_period": sched.get("quantize_period", 1)},
            "modules": ["*"]}}}}


__all__ = ["PRUNING", "CompressionConfig", "PruningGroup", "PruningShared", "WeightQuantShared",
           "from_quantize_training"]
