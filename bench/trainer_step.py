"""One GRPO step of one trainer, in this process, with its resident-memory growth and wall time.

    python bench/trainer_step.py --trainer {grpo,frpo} --loss-type {grpo,frpo,...} [--vocab 151936]
        [--hidden 64] [--layers 2] [--completion-length 128] [--generations 8]

prints one line "RESULT {json}" (bench/test_bench_trainer.py runs it once per trainer, each in a fresh
process, so that one trainer's freed-but-kept heap, imports and caches never count against the other).

--trainer grpo is TRL's stock GRPOTrainer (GRPOConfig), --trainer frpo is
frpo_kernels.integrations.trl.FRPOTrainer (FRPOConfig). The model is a random Llama built here from a
fixed seed (tie_word_embeddings=False; the same weights in every process) with a word-level tokenizer
of --vocab tokens, passed to the trainer as objects (nothing is downloaded or read from disk). One
prompt x --generations completions, per_device_train_batch_size = num_generations, max_steps=1, beta=0,
use_cpu. Completions are exactly --completion-length tokens: generation_kwargs min_new_tokens (the
EOS logit is -inf until then) and max_new_tokens = max_completion_length; the result reports the
measured lengths.

Memory (Linux): the kernel's high-water mark of resident memory, VmHWM in /proc/self/status, reset to
the current RSS by writing "5" to /proc/self/clear_refs. It is reset right before trainer.train(),
so growth = (peak RSS during train()) - (RSS right before train()): every page train() touches
beyond what model + tokenizer + trainer construction already hold (generation, scoring, autograd
graph, gradients, optimizer state, glibc heap kept after free), exact (no sampling interval). Phases
(generation + scoring, loss forward, backward, optimizer step) are wrapped on the trainer instance:
at each phase boundary the running HWM is folded into the step's peak and reset, so each phase gets
its own peak above the RSS at its start, and the step's peak stays exact. Where clear_refs cannot be
written, a background thread samples /proc/self/statm every 1 ms instead (reported as method
"statm-1ms").

Time: train()'s wall seconds (train_s), the process's CPU seconds over all threads during it
(train_cpu_s), and each phase's wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
import warnings

from proc_status import status_kib

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _cpu_s():
    """CPU seconds of this process so far, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


class PeakRss:
    """Peak RSS since the last mark(): VmHWM reset through clear_refs, or a 1 ms statm sampler."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            status_kib("VmHWM")
            self.method = "VmHWM"
        except (OSError, KeyError):
            self.method = "statm-1ms"
            self._max = _rss_kib()
            self._lock = threading.Lock()
            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_kib()
            with self._lock:
                self._max = max(self._max, rss)
            time.sleep(0.001)

    def peak_kib(self):
        """Peak RSS since the last reset (including now)."""
        if self.method == "VmHWM":
            return status_kib("VmHWM")
        with self._lock:
            return max(self._max, _rss_kib())

    def reset(self):
        if self.method == "VmHWM":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            with self._lock:
                self._max = _rss_kib()


class StepMeter:
    """The step's peak RSS plus per-phase (peak above the phase's start RSS, RSS kept, seconds)."""

    def __init__(self):
        self.rss = PeakRss()
        self.peak_kib = 0
        self.phases = []
        self._depth = 0

    def _fold(self):
        self.peak_kib = max(self.peak_kib, self.rss.peak_kib())

    def start(self):
        self.rss.reset()
        self.base_kib = _rss_kib()
        self.peak_kib = self.base_kib

    def wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self._depth:  # a phase inside a phase (not expected): attribute it to the outer one
                return fn(*args, **kwargs)
            self._depth += 1
            self._fold()
            self.rss.reset()
            before = _rss_kib()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                peak = self.rss.peak_kib()
                self.peak_kib = max(self.peak_kib, peak)
                self.phases.append(dict(phase=name, start_mib=(before - self.base_kib) / 1024,
                                        peak_above_start_mib=(peak - before) / 1024,
                                        kept_mib=(_rss_kib() - before) / 1024, seconds=seconds))
                self._depth -= 1
        return wrapped

    def growth_mib(self):
        self._fold()
        return (self.peak_kib - self.base_kib) / 1024


WORDS = 64  # prompt words come from the first ones


def build(vocab, hidden, layers, seed=0):
    import tokenizers
    import torch
    import transformers

    names = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    prompts = [" ".join(f"w{4 + (7 * i + j) % WORDS}" for j in range(4)) for i in range(16)]
    return model, tokenizer, prompts


def reward_even_tokens(completions, completion_ids, **kwargs):
    """Toy reward: fraction of completion tokens with an even id."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=("grpo", "frpo"), required=True)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--completion-length", type=int, default=128)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--output-dir", default=None)
    a = p.parse_args(argv)

    import tempfile

    import datasets
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    warnings.filterwarnings("ignore")
    model, tokenizer, prompts = build(a.vocab, a.hidden, a.layers)
    common = dict(per_device_train_batch_size=a.generations, num_generations=a.generations,
                  max_completion_length=a.completion_length, max_steps=1, learning_rate=1e-4, use_cpu=True,
                  bf16=False, beta=0.0, loss_type=a.loss_type, report_to="none", save_strategy="no",
                  logging_steps=1, seed=0, temperature=1.0, dataloader_num_workers=0, disable_tqdm=True,
                  generation_kwargs={"min_new_tokens": a.completion_length})
    out_dir = a.output_dir or tempfile.mkdtemp(prefix="trainer_step_")
    if a.trainer == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from frpo_kernels.integrations.trl import FRPOConfig as Config, FRPOTrainer as Trainer
    trainer = Trainer(model=model, reward_funcs=reward_even_tokens, args=Config(output_dir=out_dir, **common),
                      train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)

    meter = StepMeter()
    lengths = []
    generate = trainer._generate_and_score_completions

    def generate_and_record(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.extend(out["completion_mask"].sum(1).tolist())
        return out

    trainer._generate_and_score_completions = meter.wrap("generate+score", generate_and_record)
    trainer.compute_loss = meter.wrap("loss forward", trainer.compute_loss)
    trainer.accelerator.backward = meter.wrap("backward", trainer.accelerator.backward)
    # the optimizer is created inside train(): time its step through torch's global step hooks
    opt_state = {}

    def pre(optimizer, args, kwargs):
        meter._fold()
        meter.rss.reset()
        opt_state.update(before=_rss_kib(), t0=time.perf_counter())

    def post(optimizer, args, kwargs):
        if "before" not in opt_state:
            return
        peak = meter.rss.peak_kib()
        meter.peak_kib = max(meter.peak_kib, peak)
        before = opt_state.pop("before")
        meter.phases.append(dict(phase="optimizer step", start_mib=(before - meter.base_kib) / 1024,
                                 peak_above_start_mib=(peak - before) / 1024, kept_mib=(_rss_kib() - before) / 1024,
                                 seconds=time.perf_counter() - opt_state.pop("t0")))

    hooks = [register_optimizer_step_pre_hook(pre),
             register_optimizer_step_post_hook(post)]

    meter.start()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    train_cpu_s = _cpu_s() - cpu0
    growth = meter.growth_mib()
    for h in hooks:
        h.remove()

    params = sum(p.numel() for p in trainer.model.parameters())
    result = dict(trainer={"grpo": "GRPOTrainer", "frpo": "FRPOTrainer"}[a.trainer], loss_type=a.loss_type,
                  vocab=a.vocab, hidden=a.hidden, layers=a.layers, generations=a.generations,
                  completion_length=a.completion_length, completion_lengths=sorted(set(lengths)),
                  steps=trainer.state.global_step, params=params, rss_before_mib=meter.base_kib / 1024,
                  growth_mib=growth, train_s=train_s, train_cpu_s=train_cpu_s, method=meter.rss.method,
                  phases=meter.phases, threads=torch.get_num_threads(),
                  loss=next((h.get("loss") for h in trainer.state.log_history if "loss" in h), None))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
