"""The command line as a user runs it: subprocesses for the whole job, in-process calls for each bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import sample, training_argv
from dreambooth_moslora import load_moslora
from dreambooth_moslora.verbs.cli import main
from helpers import write_images, write_two_subjects

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def subject(tmp_path):
    write_images(tmp_path / "subject", sizes=((96, 64), (64, 96), (80, 80), (64, 64)))
    return tmp_path / "subject"


def test_train_script_end_to_end_writes_every_output_and_each_loads(tiny_sdxl_dir, subject, tmp_path):
    out = tmp_path / "out"
    argv = training_argv(tiny_sdxl_dir, subject, out, "--validation_prompt", "a photo of sks dog at the beach",
                         "--num_validation_images", "1", "--num_inference_steps", "2", "--report_to", "tensorboard",
                         steps=3)
    done = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *argv], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout and "s/step" in done.stdout and "peak" in done.stdout
    for name in ("moslora.safetensors", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md",
                 "validation/final-step-3/000-0.png", "checkpoint-3/moslora.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    images = []
    for load in (lambda p: load_moslora(p, out / "moslora.safetensors"),
                 lambda p: p.load_lora_weights(out),
                 lambda p: p.load_lora_weights(out, weight_name="lora_kohya.safetensors")):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.set_progress_bar_config(disable=True)
        load(pipe)
        images.append(sample(pipe))
    assert (images[1] - images[0]).abs().max() < 1e-4 and (images[2] - images[0]).abs().max() < 1e-4


def test_cli_verb_trains_too(tiny_sdxl_dir, subject, tmp_path, fresh_accelerate):
    assert main(["train", *training_argv(tiny_sdxl_dir, subject, tmp_path / "out", steps=1)]) == 0
    assert (tmp_path / "out" / "lora_kohya.safetensors").is_file()


def test_tiny_pipeline_verb(tmp_path):
    assert main(["tiny-pipeline", str(tmp_path / "tiny"), "--seed", "2"]) == 0
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    files = [p for p in (tmp_path / "tiny").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(p.stat().st_mode & 0o777 == _file_mode_of_open() for p in files)  # others can read the weights too


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda argv, tmp: _set(argv, "--instance_data_dir", str(tmp / "missing")), "image folder not found"),
        (lambda argv, tmp: _set(argv, "--instance_data_dir", str(_mkdir(tmp / "empty"))), "no images in"),
        (lambda argv, tmp: _set(argv, "--instance_data_dir", str(_notes(tmp / "notes"))), "no images in"),
        (lambda argv, tmp: _set(argv, "--pretrained_model_name_or_path", str(tmp / "no-model")), "model folder not found"),
        (lambda argv, tmp: _set(argv, "--resolution", "100"), "--resolution must be a positive multiple of 8"),
        (lambda argv, tmp: _set(argv, "--learning_rate", "-1e-3"), "--learning_rate must be a positive number"),
        (lambda argv, tmp: _set(argv, "--max_train_steps", "-5"), "--max_train_steps must be at least 1"),
        (lambda argv, tmp: argv + ["--with_prior_preservation", "--class_data_dir", str(tmp / "c")],
         "--with_prior_preservation needs --class_prompt"),
        (lambda argv, tmp: _set(argv, "--pretrained_model_name_or_path", str(_mkdir(tmp / "not-sdxl"))),
         "could not load the SDXL model"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_no_adapter(tiny_sdxl_dir, subject, tmp_path, capsys, change,
                                                             message, fresh_accelerate):
    out = tmp_path / "out"
    argv = change(training_argv(tiny_sdxl_dir, subject, out), tmp_path)
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    assert not list(out.rglob("*.safetensors")) if out.exists() else True


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(tmp_path),
         "--instance_data_dir", str(tmp_path / "nothing"), "--instance_prompt", "a photo of sks dog"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: image folder not found: {tmp_path / 'nothing'}"
    assert "Traceback" not in done.stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_sdxl_dir, subject, tmp_path):
    out = tmp_path / "out"
    argv = training_argv(tiny_sdxl_dir, subject, out, "--checkpointing_steps", "1000", "--report_to", "tensorboard",
                         steps=100000)
    process = subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth.py"), *argv], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "logs").exists() and time.time() < deadline:  # a tracker folder exists once training runs
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    saved = list(out.glob("checkpoint-*"))
    assert len(saved) == 1 and f"saved {saved[0]}" in stderr
    assert not (out / "moslora.safetensors").exists()
    steps = int(saved[0].name.split("-")[1])
    assert steps > 0
    resumed = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"),
                              *_set(argv, "--max_train_steps", str(steps + 1)), "--resume_from_checkpoint", "latest"],
                             env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "trained 1 steps" in resumed.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_two_processes_train_one_loadable_adapter(tiny_sdxl_dir, subject, tmp_path, tiny_pipe):
    out = tmp_path / "out"
    argv = training_argv(tiny_sdxl_dir, subject, out, steps=2)
    done = _train_in_two_processes(argv, port=29533, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1  # only the main process writes and reports
    load_moslora(tiny_pipe, out / "moslora.safetensors")
    assert sample(tiny_pipe).isfinite().all()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_two_processes_train_the_text_side_against_the_base_model_prior(tmp_path):
    """Only some processes' micro-batches hold class examples; the base model's prompt embeddings must not be a
    collective call (it was: a hang)."""
    write_images(tmp_path / "photos", sizes=((32, 32),) * 4)
    argv = training_argv(ROOT / "assets" / "mini-sdxl", tmp_path / "photos", tmp_path / "out", "--resolution", "32",
                         "--train_text_encoder", "--train_trigger_embedding", "sks", "--with_prior_preservation",
                         "--prior_preservation_mode", "base_model", "--class_prompt", "a photo of a dog", steps=3)
    done = _train_in_two_processes(argv, port=29534, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "trigger_embedding.safetensors").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_two_processes_train_two_subjects_from_a_dataset_file(tiny_sdxl_dir, tmp_path):
    """Each process's share of every epoch holds other concepts: base-model prior, masks, a shared class set."""
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--dataset_config",
            str(write_two_subjects(tmp_path)), "--output_dir", str(tmp_path / "out"), "--resolution", "64",
            "--report_to", "none", "--max_train_steps", "3", "--train_batch_size", "2"]
    done = _train_in_two_processes(argv, port=29535, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 3 steps") == 1


def _train_in_two_processes(argv, port: int, timeout: int) -> subprocess.CompletedProcess:
    """torchrun with two processes on this machine (gloo), one thread each so they do not starve each other."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(ROOT / "train_dreambooth.py"), *argv],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout,
    )


def _set(argv, option, value):
    index = argv.index(option)
    return argv[:index + 1] + [value] + argv[index + 2:]


def _mkdir(path):
    path.mkdir(parents=True)
    return path


def _notes(path):
    _mkdir(path)
    (path / "readme.txt").write_text("no pictures here")
    return path


def test_generate_verb(trained, tiny_sdxl_dir, tmp_path, capsys):
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter",
                 str(trained["dir"] / "lora_kohya.safetensors"), "--prompt", "a photo of sks dog", "--prompt",
                 "a sks dog", "--num_images_per_prompt", "1", "--batch_size", "2", "--num_inference_steps", "2",
                 "--scheduler", "dpm++_2m_karras", "--fuse", "--output_dir", str(tmp_path / "images")])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000-0.png", "001-0.png", "grid.png"]
    code = main(["generate", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--prompt", "a dog",
                 "--batch_size", "0", "--output_dir", str(tmp_path / "none")])
    assert code != 0 and "--batch_size must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_inspect_and_export_verbs(trained, tmp_path, capsys):
    assert main(["inspect", str(trained["dir"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "native"
    assert main(["inspect", str(trained["dir"] / "lora_kohya.safetensors")]) == 0
    assert "format      kohya" in capsys.readouterr().out
    assert main(["export", str(trained["dir"] / "moslora.safetensors"), "--format", "kohya", "--rank", "2",
                 "--output", str(tmp_path / "small.safetensors")]) == 0
    assert "rank 2 keeps ΔW to a relative error of 0." in capsys.readouterr().out
    assert (tmp_path / "small.safetensors").is_file()


def test_the_file_verbs_start_without_diffusers_or_transformers(trained, tmp_path):
    script = ("import sys\nfrom dreambooth_moslora.verbs.cli import main\n"
              f"assert main(['inspect', {str(trained['dir'])!r}]) == 0\n"
              f"assert main(['export', {str(trained['dir'] / 'moslora.safetensors')!r}, '--format', 'kohya', '--output', "
              f"{str(tmp_path / 'out.safetensors')!r}]) == 0\n"
              "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]" and (tmp_path / "out.safetensors").is_file()


def test_evaluate_verb(trained, tiny_sdxl_dir, feature_models, tmp_path, capsys):
    write_images(tmp_path / "subject", sizes=((64, 64), (64, 64)), seed=3)
    code = main(["evaluate", "--pretrained_model_name_or_path", str(tiny_sdxl_dir), "--adapter",
                 f"moslora={trained['dir']}", "--subject_dir", str(tmp_path / "subject"), "--class_noun", "dog",
                 "--prompt_list", "live", "--num_images_per_prompt", "1", "--num_inference_steps", "1",
                 "--dino_model", str(feature_models[0]), "--clip_model", str(feature_models[1]),
                 "--output_dir", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    assert "| moslora |" in capsys.readouterr().out
    assert len(list((tmp_path / "eval" / "images" / "moslora").glob("0*.png"))) == 25


@pytest.mark.parametrize("argv, message", [
    (["inspect", "{tmp}/missing.safetensors"], "adapter file not found"),
    (["export", "{trained}/pytorch_lora_weights.safetensors", "--format", "kohya", "--output", "{tmp}/x.safetensors"],
     "is not a native MoSLoRA file"),
    (["generate", "--pretrained_model_name_or_path", "{tiny}", "--adapter", "{tmp}/foreign.safetensors",
      "--prompt", "x", "--output_dir", "{tmp}/o"], "is not a LoRA or MoSLoRA adapter file"),
    (["generate", "--pretrained_model_name_or_path", "{tiny}", "--prompts_file", "{tmp}/empty.txt",
      "--output_dir", "{tmp}/o"], "has no prompts"),
    (["generate", "--pretrained_model_name_or_path", "{tiny}", "--adapter", "{tmp}/other-base.safetensors",
      "--prompt", "x", "--output_dir", "{tmp}/o"], "the adapter was trained on another base model"),
    (["generate", "--pretrained_model_name_or_path", "{tmp}/merge.safetensors", "--prompt", "x",
      "--output_dir", "{tmp}/o"], "is a single-file model: name a diffusers folder of the same architecture"),
    (["evaluate", "--pretrained_model_name_or_path", "{tmp}/merge.ckpt", "--adapter", "a={trained}",
      "--subject_dir", "{tmp}", "--class_noun", "dog", "--output_dir", "{tmp}/o"], "only .safetensors model files"),
])
def test_verb_errors_are_one_line_and_exit_2(trained, tiny_sdxl_dir, tmp_path, capsys, argv, message):
    save_file({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(2)}, tmp_path / "merge.safetensors")
    (tmp_path / "empty.txt").write_text("\n")
    native = trained["dir"] / "moslora.safetensors"
    with safe_open(str(native), framework="pt") as handle:
        metadata = handle.metadata()
    narrower = {k: (v[:, :-1].contiguous() if k.endswith("lora_A.weight") else v) for k, v in load_file(native).items()}
    save_file(narrower, tmp_path / "other-base.safetensors", metadata=metadata)
    filled = [a.format(tmp=tmp_path, trained=trained["dir"], tiny=tiny_sdxl_dir) for a in argv]
    assert main(filled) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()


def _file_mode_of_open() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def test_a_fresh_run_prints_only_our_lines_records_an_absolute_base_and_writes_readable_files(tiny_sdxl_dir,
                                                                                              subject, tmp_path):
    out = tmp_path / "out"
    relative_base = os.path.relpath(tiny_sdxl_dir, tmp_path)
    argv = training_argv(relative_base, subject, out, "--validation_prompt", "a photo of sks dog",
                         "--num_validation_images", "1", "--num_inference_steps", "2", steps=2)
    done = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), *argv], cwd=tmp_path,
                          env={**ENV, "TQDM_DISABLE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("%|", "it/s", "torchvision", "Warning", "deprecated"):
        assert noise not in done.stderr, done.stderr
    card = (out / "README.md").read_text()
    assert f"base_model: {Path(tiny_sdxl_dir).resolve()}" in card
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == _file_mode_of_open() for p in files)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".lock"))]


@pytest.mark.parametrize("verb", ["train", "generate", "export"])
def test_an_output_folder_that_is_a_file_is_refused_before_any_model_is_loaded(trained, subject, tmp_path, capsys,
                                                                             verb, fresh_accelerate):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    no_model = "nobody/no-such-model"  # a hub id (not checked as a folder): loading it offline would fail first
    argv = {
        "train": ["train", *training_argv(no_model, subject, taken)],
        "generate": ["generate", "--pretrained_model_name_or_path", no_model, "--prompt", "x", "--output_dir", str(taken)],
        "export": ["export", str(trained["dir"] / "moslora.safetensors"), "--format", "kohya",
                   "--output", str(taken / "x.safetensors")],
    }[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "is a file" in err[-1] and "taken" in err[-1]
    assert taken.read_text() == "a file"


def test_a_second_run_into_the_same_folder_is_refused_at_start(tiny_sdxl_dir, subject, tmp_path, capsys,
                                                               fresh_accelerate):
    from dreambooth_moslora.trainer.output_lock import output_folder_lock

    out = tmp_path / "out"
    with output_folder_lock(out):  # as a first run holds it
        assert main(["train", *training_argv(tiny_sdxl_dir, subject, out)]) == 2
        assert [p.name for p in out.iterdir()] == [".dreambooth-moslora.lock"]  # the first run's, untouched
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --output_dir") and f"PID {os.getpid()}" in err


def test_ctrl_c_before_the_first_step_exits_130_and_writes_nothing(tiny_sdxl_dir, subject, tmp_path, capsys,
                                                                   monkeypatch, fresh_accelerate):
    import dreambooth_moslora.trainer.setup as trainer_setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_setup, "cache_prompt_embeddings", interrupted)  # Ctrl-C while caching
    out = tmp_path / "out"
    assert main(["train", *training_argv(tiny_sdxl_dir, subject, out)]) == 130
    assert not out.exists()


def test_a_prompt_without_a_trigger_and_a_far_resolution_are_warned(tiny_sdxl_dir, subject, tmp_path, caplog,
                                                                    fresh_accelerate):
    argv = training_argv(tiny_sdxl_dir, subject, tmp_path / "out", "--no_bucketing", steps=1)
    argv = _set(_set(argv, "--instance_prompt", "a photo of a dog"), "--resolution", "256")
    assert main(["train", *argv]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("is an ordinary word" in w for w in warnings)
    assert any("--resolution 256 is far from the 64 px" in w for w in warnings)


def test_a_dangling_symlink_among_the_photos_is_warned(tiny_sdxl_dir, subject, tmp_path, caplog, fresh_accelerate):
    (subject / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert main(["train", *training_argv(tiny_sdxl_dir, subject, tmp_path / "out", steps=1)]) == 0
    assert any("gone.png" in r.getMessage() and "broken symbolic link" in r.getMessage() for r in caplog.records)


def test_resuming_logs_what_caching_saves_for_the_steps_left(tiny_sdxl_dir, subject, tmp_path, caplog,
                                                            fresh_accelerate):
    from accelerate.state import AcceleratorState

    caplog.set_level("INFO")
    out = tmp_path / "out"
    assert main(["train", *training_argv(tiny_sdxl_dir, subject, out, "--center_crop", steps=3)]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    caplog.clear()
    argv = training_argv(tiny_sdxl_dir, subject, out, "--center_crop", "--resume_from_checkpoint", "latest", steps=5)
    assert main(["train", *argv]) == 0
    caching = [r.getMessage() for r in caplog.records if "caching took" in r.getMessage()]
    assert "prompt encodings replace 2" in caching[0]
