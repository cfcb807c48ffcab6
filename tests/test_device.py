"""Device and dtype resolution, the model's training defaults, and the Trainer arguments they become."""

import copy

import pytest
import torch

from carl_assets.carl.run_config import GRPORunConfig, SFTRunConfig
from carl_assets.carl.trl_config import trl_config
from carl_assets.defs.training_config import GRPOCheckpointConfig, SFTCheckpointConfig
from carl_assets.models.defaults import (
    OFFLINE_DEFAULTS,
    REAL_MODEL_DEFAULTS,
    is_offline_model,
    resolve_placement,
    training_defaults,
)
from carl_assets.models.device import available_devices, resolve_device, resolve_dtype, training_weights_dtype
from carl_assets.models.loading import MODEL_INFO_FILE, load_model_and_tokenizer

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")


@no_cuda
def test_auto_device_and_dtype_on_a_cpu_machine():
    expected = "mps" if "mps" in available_devices() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "auto") == torch.float32  # MPS stays fp32 unless asked


def test_explicit_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert training_weights_dtype(torch.float16) == torch.float32  # fp16 trains on fp32 master weights
    assert training_weights_dtype(torch.bfloat16) == torch.float32  # bf16 too: updates below bf16 rounding


@no_cuda
def test_asking_for_a_missing_device_names_it_and_what_is_there():
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{spec}'.*CUDA is not available.*available: .*cpu"):
            resolve_device(spec)


def test_unknown_device_and_dtype_are_named():
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'.*auto, cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"unsupported device 'meta'"):
        resolve_device("meta")
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'.*auto, bf16, fp16, fp32"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match=r"unsupported dtype torch.float64"):
        resolve_dtype(torch.float64)


def test_offline_defaults_are_todays_tuned_values():
    sft = SFTCheckpointConfig().run_config(1.5e-3, offline=True)
    assert (sft.max_steps, sft.learning_rate, sft.lr_scheduler_type, sft.batch_size) == (
        400,
        1.5e-3,
        "constant",
        8,
    )
    assert (sft.gradient_accumulation_steps, sft.warmup_ratio, sft.gradient_checkpointing) == (1, 0.0, False)
    assert (sft.device, sft.dtype) == ("cpu", "fp32")
    grpo = GRPOCheckpointConfig().run_config(offline=True)
    assert (
        grpo.max_steps,
        grpo.learning_rate,
        grpo.batch_size,
        grpo.num_generations,
        grpo.max_completion_length,
    ) == (16, 1e-4, 8, 4, 24)
    assert (
        grpo.lr_scheduler_type,
        grpo.warmup_ratio,
        grpo.gradient_accumulation_steps,
        grpo.gradient_checkpointing,
    ) == ("linear", 0.0, 1, False)
    assert OFFLINE_DEFAULTS.dtype == "fp32"
    # On this machine the offline model is placed in fp32 whatever "auto" would pick for a real one.
    assert resolve_placement("cpu", "auto", offline=True) == (torch.device("cpu"), torch.float32)


def test_real_model_defaults_and_explicit_values_win():
    assert training_defaults(False) is REAL_MODEL_DEFAULTS
    sft = SFTCheckpointConfig().run_config(2e-5, offline=False)
    assert (sft.max_steps, sft.lr_scheduler_type, sft.batch_size, sft.gradient_accumulation_steps) == (
        300,
        "cosine",
        4,
        4,
    )
    assert sft.warmup_ratio == pytest.approx(0.03) and sft.gradient_checkpointing is True
    grpo = GRPOCheckpointConfig().run_config(offline=False)
    assert (grpo.learning_rate, grpo.num_generations, grpo.max_completion_length, grpo.batch_size) == (
        1e-6,
        8,
        256,
        8,
    )
    mine = GRPOCheckpointConfig(
        num_generations=3,
        warmup_ratio=0.0,
        gradient_checkpointing=False,
        lr_scheduler_type="constant",
        gradient_accumulation_steps=2,
    ).run_config(offline=False)
    assert mine.batch_size == 9  # the default 8 rounded up to whole groups of 3
    assert (
        mine.warmup_ratio,
        mine.gradient_checkpointing,
        mine.lr_scheduler_type,
        mine.gradient_accumulation_steps,
    ) == (0.0, False, "constant", 2)


def test_trainer_arguments_follow_device_dtype_and_checkpointing(tmp_path):
    fp32 = trl_config(SFTRunConfig(device="cpu").resolved(offline=True), tmp_path)
    assert fp32.use_cpu is True and fp32.bf16 is False and fp32.fp16 is False
    assert fp32.activation_checkpointing is False
    bf16 = trl_config(
        GRPORunConfig(device="cpu", dtype="bf16", gradient_checkpointing=True).resolved(True), tmp_path
    )
    assert bf16.bf16 is True and bf16.fp16 is False and bf16.activation_checkpointing is True
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        trl_config(SFTRunConfig(device="cpu", dtype="fp16").resolved(offline=True), tmp_path)
    assert trl_config(GRPORunConfig(warmup_ratio=0.1).resolved(True), tmp_path).warmup_steps == pytest.approx(
        0.1
    )
    assert trl_config(GRPORunConfig().resolved(True), tmp_path).warmup_steps == 0
    with pytest.raises(ValueError, match="warmup_ratio"):
        GRPORunConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="max_steps.*not set.*resolved"):
        trl_config(SFTRunConfig(), tmp_path)  # unresolved: the model's defaults not filled in


def test_load_places_the_model_in_the_asked_dtype(tmp_path, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    copy.deepcopy(model).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    default, _ = load_model_and_tokenizer(tmp_path)
    assert (
        next(default.parameters()).dtype == torch.float32 and next(default.parameters()).device.type == "cpu"
    )
    half, _ = load_model_and_tokenizer(tmp_path, device="cpu", dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ref = model.model.embed_tokens.weight
    cos = torch.nn.functional.cosine_similarity(
        half.model.embed_tokens.weight.float().flatten(), ref.flatten(), dim=0
    )
    assert float(cos.detach()) > 0.999
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model_and_tokenizer(tmp_path, dtype="fp8")
    assert not is_offline_model(tmp_path)
    (tmp_path / MODEL_INFO_FILE).write_text('{"source": "offline"}')
    assert is_offline_model(tmp_path)


def test_cpu_bf16_detection_reads_the_flags_and_the_override(monkeypatch):
    from carl_assets.models import device

    monkeypatch.delenv(device.CPU_BF16_ENV, raising=False)
    speedup = {"value": 2.2}
    monkeypatch.setattr(device, "_measured_bf16_speedup", lambda: speedup["value"])
    monkeypatch.setattr(device, "_cpuinfo_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert device.cpu_bf16_supported() and device.fast_dtype("cpu") == torch.bfloat16
    speedup["value"] = 1.1  # native bf16, but measured too little faster: inference stays fp32
    assert device.cpu_bf16_supported() and not device.cpu_bf16_faster()
    assert device.fast_dtype("cpu") == torch.float32
    monkeypatch.setattr(device, "_cpuinfo_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert device.cpu_bf16_supported()
    speedup["value"] = 3.0
    monkeypatch.setattr(device, "_cpuinfo_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not device.cpu_bf16_supported() and device.fast_dtype("cpu") == torch.float32  # no flags: no bf16
    monkeypatch.setenv(device.CPU_BF16_ENV, "1")
    assert device.cpu_bf16_supported()
    monkeypatch.setattr(device, "_cpuinfo_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setenv(device.CPU_BF16_ENV, "0")
    assert not device.cpu_bf16_supported()


@no_cuda
def test_auto_dtype_runs_a_real_model_in_bf16_where_the_cpu_has_it_and_it_is_faster(monkeypatch):
    from carl_assets.models import defaults, device

    cpu = torch.device("cpu")
    monkeypatch.setenv(device.CPU_BF16_ENV, "1")
    assert resolve_placement("cpu", "auto", offline=False) == (cpu, torch.bfloat16)  # inference
    assert resolve_placement("cpu", "auto", offline=True) == (
        cpu,
        torch.float32,
    )  # the offline model's tuned runs
    assert resolve_placement("cpu", "fp32", offline=False) == (cpu, torch.float32)  # asked for
    assert resolve_placement("cpu", "bf16", offline=False, purpose="training") == (cpu, torch.bfloat16)
    # training on a CPU: fp32, measured (bf16 autocast no faster and its loss lagged)
    assert defaults.CPU_TRAINING_DTYPE == "fp32"
    assert resolve_placement("cpu", "auto", offline=False, purpose="training") == (cpu, torch.float32)
    monkeypatch.setattr(defaults, "CPU_TRAINING_DTYPE", "bf16")
    assert resolve_placement("cpu", "auto", offline=False, purpose="training") == (cpu, torch.bfloat16)
    monkeypatch.setenv(device.CPU_BF16_ENV, "0")
    assert resolve_placement("cpu", "auto", offline=False) == (cpu, torch.float32)
    assert resolve_placement("cpu", "auto", offline=False, purpose="training") == (cpu, torch.float32)
    with pytest.raises(ValueError, match="unknown purpose 'serving'"):
        resolve_placement("cpu", "auto", offline=False, purpose="serving")


def test_threads_default_to_the_usable_cores_for_a_real_model(monkeypatch):
    import os

    from carl_assets.models import device
    from carl_assets.models.defaults import default_threads, resolve_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(device, "_cgroup_cpu_limit", lambda: None)
    assert device.available_cores() == 6
    monkeypatch.setattr(device, "_cgroup_cpu_limit", lambda: 2.5)  # a container quota of 2.5 CPUs
    assert device.available_cores() == 3
    assert default_threads(offline=False) == 3 and default_threads(offline=True) == 1
    assert resolve_threads(0, offline=False) == 3 and resolve_threads(None, offline=True) == 1
    assert resolve_threads(5, offline=True) == 5  # asked for
    with pytest.raises(ValueError, match="threads must be None"):
        resolve_threads(-1, offline=False)
    with pytest.raises(ValueError, match="threads"):
        SFTCheckpointConfig(threads=0)  # None is the model's default; a count is at least 1
    assert SFTCheckpointConfig().run_config(1e-3, offline=False).threads == 3
    assert GRPOCheckpointConfig(threads=2).run_config(offline=True).threads == 2
    assert SFTCheckpointConfig().run_config(1e-3, offline=True).threads == 1


def test_sampling_and_lora_defaults_per_model():
    from carl_assets.defs.training_config import AgentEvaluationConfig

    offline = GRPOCheckpointConfig().run_config(offline=True)
    assert (offline.temperature, offline.top_p, offline.top_k, offline.min_p) == (
        1.0,
        1.0,
        0,
        0.0,
    )  # as tuned
    real = GRPOCheckpointConfig().run_config(offline=False)
    assert (real.temperature, real.top_p, real.top_k, real.min_p) == (0.8, 0.9, 0, 0.05)
    mine = GRPOCheckpointConfig(temperature=1.2, top_p=1.0, min_p=0.0, reward="self_certainty").run_config(
        False
    )
    assert (mine.temperature, mine.top_p, mine.min_p, mine.reward) == (1.2, 1.0, 0.0, "self_certainty")
    assert (offline.reward, offline.lora_r, offline.lora_target_modules) == ("carl", 0, None)
    assert real.reward == "self_certainty"  # 'auto': scorer_validation's choice for a real model
    assert GRPOCheckpointConfig(reward="carl").run_config(offline=False).reward == "carl"  # asked for
    lora = SFTCheckpointConfig(lora_r=8, lora_target_modules=["q_proj", "v_proj"]).run_config(
        1e-4, offline=False
    )
    assert (lora.lora_r, lora.lora_alpha, lora.lora_target_modules) == (8, None, ["q_proj", "v_proj"])
    assert AgentEvaluationConfig().sampling(offline=True).generate_kwargs() == {"do_sample": False}
    agent = AgentEvaluationConfig(seed=4).sampling(offline=False)
    assert (agent.temperature, agent.top_p, agent.seed) == (0.7, 0.9, 4)
    assert AgentEvaluationConfig(temperature=0.0).sampling(offline=False).generate_kwargs() == {
        "do_sample": False
    }


def test_the_bf16_speed_measurement_is_a_positive_ratio():
    from carl_assets.models import device

    ratio = device._measured_bf16_speedup()
    assert 0.05 < ratio < 50  # fp32 time / bf16 time of the same product; the decision compares it to 1.3
    assert device._measured_bf16_speedup() == ratio  # measured once per process
