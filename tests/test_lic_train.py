"""LIC training: exact resume, weights_only checkpoints, clear errors, distillation terms."""
import math

import pytest
import torch

from licforge.errors import UsageError
from licforge.flows.cli import main
from licforge.models.data import CropSampler, embedded_images
from licforge.models.lic import CheckpointError, LICConfig, build_lic, load_weights, save_weights, student_config
from licforge.models.lic_train import TrainConfig, train_lic
from helpers import Interrupt, interrupt_after


@pytest.fixture(scope="module")
def train_images():
    imgs = embedded_images("train")
    return {k: v[:96, :96] for k, v in imgs.items()}  # small crops keep the tests fast


def _run(images, cfg, tcfg, state, resume=False, stop_after=None, teacher=None):
    torch.manual_seed(tcfg.seed)
    net = build_lic(cfg)
    sampler = CropSampler(images, tcfg.crop, tcfg.batch, tcfg.seed)
    train_lic(net, sampler, tcfg, arch=cfg.to_dict(), teacher=teacher, teacher_m=teacher and teacher.M,
              after_step=interrupt_after(stop_after), state_path=state, resume=resume, save_every=3, log_every=2, log=None)
    return net


def test_interrupted_run_resumes_exactly(train_images, tmp_path):
    cfg, tcfg = student_config(4), TrainConfig(steps=6, crop=32, batch=2, seed=3)
    straight = _run(train_images, cfg, tcfg, tmp_path / "a.state.pt")
    with pytest.raises(Interrupt):  # dies during step 4, after the state of step 3 was saved
        _run(train_images, cfg, tcfg, tmp_path / "b.state.pt", stop_after=3)
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["step"] == 3
    resumed = _run(train_images, cfg, tcfg, tmp_path / "b.state.pt", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training moved the weights (the comparison above is not vacuous)
    torch.manual_seed(3)
    assert not torch.equal(build_lic(cfg).state_dict()["g_s.0.weight"], a["g_s.0.weight"])


def test_run_resumed_inside_a_log_window_logs_the_uninterrupted_averages(train_images, tmp_path):
    """Logged every 3 steps, saved every 2, interrupted during step 5: the resumed run starts at
    step 4, inside the window of steps 4-6, and must log the averages of the straight run."""
    cfg, tcfg = student_config(4), TrainConfig(steps=8, crop=32, batch=2, seed=3)

    def run(state, resume=False, stop_after=None):
        torch.manual_seed(tcfg.seed)
        net = build_lic(cfg)
        rec = train_lic(net, CropSampler(train_images, tcfg.crop, tcfg.batch, tcfg.seed), tcfg,
                        arch=cfg.to_dict(), after_step=interrupt_after(stop_after), state_path=state, resume=resume, save_every=2,
                        log_every=3, log=None)
        return net, rec["history"]

    straight, want = run(tmp_path / "a.state.pt")
    with pytest.raises(Interrupt):
        run(tmp_path / "b.state.pt", stop_after=4)
    assert torch.load(tmp_path / "b.state.pt", weights_only=True)["step"] == 4
    resumed, got = run(tmp_path / "b.state.pt", resume=True)
    assert [h["step"] for h in got] == [h["step"] for h in want] == [3, 6, 8]
    for g, w in zip(got, want):
        assert g.keys() == w.keys() == {"step", "loss", "bpp", "mse", "aux"}
        assert g == pytest.approx(w, rel=1e-12, abs=0), g["step"]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(train_images, tmp_path):
    cfg = student_config(4)
    _run(train_images, cfg, TrainConfig(steps=2, crop=32, batch=2), tmp_path / "s.state.pt")
    with pytest.raises(CheckpointError, match=r"s\.state\.pt: was made for .* other settings .*'lmbda': \(0\.013, 0\.05\)"):
        _run(train_images, cfg, TrainConfig(steps=2, crop=32, batch=2, lmbda=0.05), tmp_path / "s.state.pt",
             resume=True)


def test_weights_load_with_weights_only_and_refuse_wrong_files(tmp_path):
    cfg = student_config(8)
    torch.manual_seed(0)
    net = build_lic(cfg)
    path = save_weights(net, cfg, tmp_path / "s8.pt", {"curve": "x", "lmbda": 0.01}, half=True)
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == {"arch": "factorized", "N": 8, "M": 12, "gdn": "gdn1"}
    back, cfg2, meta = load_weights(path, expect=cfg)
    assert cfg2 == cfg and meta["lmbda"] == 0.01
    w = net.state_dict()["g_s.0.weight"]
    assert torch.equal(back.state_dict()["g_s.0.weight"], w.half().float())
    with pytest.raises(CheckpointError, match=r"s8\.pt: architecture factorized_N8_M12_gdn1 does not match "
                                              r"the requested factorized_N16_M24_gdn1"):
        load_weights(path, expect=student_config(16))
    bad = tmp_path / "cut.pt"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint .*corrupt or truncated"):
        load_weights(bad)
    text = tmp_path / "notes.pt"
    text.write_text("garbage")  # the cause, not torch's advice to load it with weights_only=False
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable checkpoint \(UnpicklingError: unpickler: "
                                              r"Unsupported operand 103\); the file is corrupt or truncated"):
        load_weights(text)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt: format None, expected 'licforge-lic-weights/1'"):
        load_weights(other)
    sd = torch.load(path, weights_only=True)
    sd["config"]["N"] = 16  # a record that lies about its architecture
    torch.save(sd, tmp_path / "lie.pt")
    with pytest.raises(CheckpointError, match=r"lie\.pt: weights do not fit architecture factorized_N16"):
        load_weights(tmp_path / "lie.pt")


def test_distillation_terms_and_identical_crops(train_images):
    a = CropSampler(train_images, 32, 2, seed=5)
    b = CropSampler(train_images, 32, 2, seed=5)
    assert all(torch.equal(a(), b()) for _ in range(3))  # with and without KD see the same crops
    torch.manual_seed(1)
    teacher = build_lic(student_config(8, gdn="gdn"))
    net = build_lic(student_config(4))
    tcfg = TrainConfig(steps=2, crop=32, batch=2, kd_recon=1.0, kd_latent=0.5)
    rec = train_lic(net, CropSampler(train_images, 32, 2), tcfg, arch={}, teacher=teacher, teacher_m=12,
                    log_every=2, log=None)
    h = rec["history"][-1]
    assert h["step"] == 2 and h["kd_recon"] > 0 and h["kd_latent"] > 0
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="need a teacher"):
        train_lic(net, CropSampler(train_images, 32, 2), tcfg, arch={}, log=None)


def test_precomputed_teacher_targets_are_cropped_with_the_images_and_the_teacher_runs_once(train_images):
    """kd_targets="precomputed": the sampler cuts the attached per-image targets at the crops'
    positions and flips (targets = the images themselves give back the crops exactly), the
    teacher runs once per training image (not per step), and the KD term of a step is the MSE
    against the teacher's whole-image reconstruction, cropped."""
    from licforge.models.lic_train import teacher_reconstructions

    s = CropSampler(train_images, 32, 4, seed=5)
    s.attach_targets([torch.from_numpy(im).permute(2, 0, 1).float() / 256.0 for im in train_images.values()])
    plain = CropSampler(train_images, 32, 4, seed=5)
    for _ in range(3):
        x, t = s.sample()
        assert torch.equal(x, plain()) and torch.equal(t, x)
    with pytest.raises(ValueError, match=r"target of image '.*' is \(8, 8\), the image \(96, 96\)"):
        s.attach_targets([torch.zeros(3, 8, 8)] * len(train_images))

    torch.manual_seed(1)
    teacher = build_lic(student_config(8, gdn="gdn"))
    calls = []
    teacher.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    ref = teacher_reconstructions(teacher, train_images)
    assert calls == [(1, 3, 128, 128)] * len(train_images) and ref[0].shape == (3, 96, 96)
    calls.clear()
    torch.manual_seed(2)
    net = build_lic(student_config(4))
    tcfg = TrainConfig(steps=3, crop=32, batch=2, kd_recon=1.0, lr=1e-9, kd_targets="precomputed")
    sampler, seen = CropSampler(train_images, 32, 2, seed=4), []
    sample = sampler.sample
    sampler.sample = lambda part=None: seen.append(sample(part)) or seen[-1]
    rec = train_lic(net, sampler, tcfg, arch={}, teacher=teacher, log_every=1, log=None)
    assert len(calls) == len(train_images)       # the reconstructions, then no teacher pass in 3 steps
    crops = CropSampler(train_images, 32, 2, seed=4)
    crops.attach_targets(ref)
    for got in seen:
        want = crops.sample()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x, t = seen[0]
    net.train()
    with torch.no_grad():
        torch.manual_seed(0)
        x_hat = net(x)["x_hat"]
    assert rec["history"][0]["kd_recon"] == pytest.approx(float(((x_hat - t) ** 2).mean() * 255 ** 2), rel=0.05)


def test_latent_distillation_runs_only_the_teachers_analysis_transform(train_images, tmp_path):
    """With precomputed reconstructions the latent term needs the teacher's analysis transform
    alone (one g_a pass per step, no whole-teacher pass after the precompute), and the term is
    the one a whole-teacher pass per step gives; a student that keeps the teacher's M is
    compared with no adapter (PRIM), one that does not through a trained 1x1 convolution."""
    torch.manual_seed(1)
    teacher = build_lic(student_config(8, gdn="gdn"))
    whole, g_a = [], []
    teacher.register_forward_hook(lambda *a: whole.append(1))
    teacher.g_a.register_forward_hook(lambda *a: g_a.append(1))
    hist = {}
    for targets in ("online", "precomputed"):
        whole.clear(), g_a.clear()
        torch.manual_seed(2)
        net = build_lic(student_config(4))
        tcfg = TrainConfig(steps=3, crop=32, batch=2, kd_recon=0.5, kd_latent=1.0, kd_targets=targets)
        hist[targets] = train_lic(net, CropSampler(train_images, 32, 2, seed=4), tcfg, arch={}, teacher=teacher,
                                  teacher_m=12, log_every=1, log=None)["history"]
        n = len(train_images) if targets == "precomputed" else 0
        assert (len(whole), len(g_a)) == (n + (3 if targets == "online" else 0), n + 3)
    # the first step's latent term is the same (then the two reconstruction targets move the students apart)
    assert hist["online"][0]["kd_latent"] == pytest.approx(hist["precomputed"][0]["kd_latent"], rel=1e-6)
    assert hist["online"][0]["kd_recon"] == pytest.approx(hist["precomputed"][0]["kd_recon"], rel=0.2)
    x = CropSampler(train_images, 32, 2, seed=4)()
    for m, adapter_keys in ((12, []), (6, ["bias", "weight"])):
        torch.manual_seed(2)
        net = build_lic(LICConfig("factorized", 4, m, "gdn1"))
        with torch.no_grad():
            y_s, y_t = net.g_a(x), teacher.g_a(x)
        state = tmp_path / f"{m}.state.pt"
        tcfg = TrainConfig(steps=1, crop=32, batch=2, kd_latent=1.0)
        rec = train_lic(net, CropSampler(train_images, 32, 2, seed=4), tcfg, arch={}, teacher=teacher, teacher_m=12,
                        state_path=state, log_every=1, log=None)
        assert sorted(torch.load(state, weights_only=False)["adapter"]) == adapter_keys
        if m == 12:
            assert rec["history"][0]["kd_latent"] == pytest.approx(float(((y_s - y_t) ** 2).mean()), rel=1e-6)


def test_cli_precomputed_targets_are_computed_once_per_teacher_and_data(train_images, tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "img" / split).mkdir(parents=True)
        for name, im in list(train_images.items())[:2]:
            Image.fromarray(im).save(tmp_path / "img" / split / f"{name}.png")
    torch.manual_seed(1)
    tcfg = student_config(8, gdn="gdn")
    save_weights(build_lic(tcfg), tcfg, tmp_path / "t.pt", {"lmbda": 0.013})
    cmd = ["distill", "--N", "4", "--teacher", str(tmp_path / "t.pt"), "--data", str(tmp_path / "img"), "--steps", "2",
           "--crop", "32", "--batch", "2", "--kd-targets", "precomputed"]
    for k in range(2):
        assert main(cmd + ["--out", str(tmp_path / "out" / f"s{k}.pt")]) == 0
        log = capsys.readouterr().out
        assert ("teacher reconstructions of 2 training images" in log) == (k == 0)
    assert len(list((tmp_path / "out" / "kd-targets").glob("*.pt"))) == 1
    assert main(cmd + ["--kd-recon", "0", "--kd-latent", "1", "--out", str(tmp_path / "x.pt")]) == 0
    log = capsys.readouterr().out  # latent KD alone: no reconstructions needed, none computed
    assert "kd_latent" in log and "teacher reconstructions" not in log


def test_cli_refuses_a_corrupt_teacher_and_a_bad_crop(tmp_path, capsys):
    bad = tmp_path / "t.pt"
    bad.write_bytes(b"\x00" * 100)
    rc = main(["distill", "--teacher", str(bad), "--steps", "1", "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "t.pt: not a readable checkpoint" in err and "Traceback" not in err
    rc = main(["train", "--N", "8", "--crop", "40", "--out", str(tmp_path / "s.pt")])
    assert rc == 2 and "--crop must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


def test_interpolated_distillation_loss_keeps_the_distortion_weight(train_images):
    """kd_recon = 1 - dist_weight: the loss is bpp + lambda * (w D + (1 - w) KD_x), no extra weight."""
    torch.manual_seed(1)
    teacher = build_lic(student_config(8, gdn="gdn"))
    net = build_lic(student_config(4))
    tcfg = TrainConfig(steps=1, crop=32, batch=2, lmbda=0.01, kd_recon=0.25, dist_weight=0.75)
    h = train_lic(net, CropSampler(train_images, 32, 2), tcfg, arch={}, teacher=teacher, teacher_m=12,
                  log_every=1, log=None)["history"][0]
    assert h["loss"] == pytest.approx(h["bpp"] + 0.01 * (0.75 * h["mse"] + 0.25 * h["kd_recon"]), rel=1e-6)


def test_bench_kd_variants_train_like_the_student_without_kd():
    """A screened distillation variant differs from the student without KD only in its loss weights and
    teacher (same steps, learning rate, crops, seed); KD in fine-tuning only starts from the plain base."""
    from pathlib import Path

    from licforge.bench.lic import plan

    jobs = {j.name: j for j in plan(Path("w"))}
    assert jobs["s16_nokd_l0.0067"].args == [
        "distill", "--N", "16", "--gdn", "gdn1", "--kd-recon", "0", "--lmbda", "0.0067", "--steps", "800", "--lr",
        "0.001", "--curve", "N=16 GDN1", "--out", "w/s16_nokd_l0.0067.pt", "--init", "w/s16_nokd_base.pt"]
    assert jobs["s16_kdv_mix50-ft_l0.0067"].args == [
        "distill", "--N", "16", "--gdn", "gdn1", "--kd-recon", "0.5", "--kd-latent", "0.0", "--dist-weight", "0.5",
        "--lmbda", "0.0067", "--steps", "800", "--lr", "0.001", "--curve", "N=16 GDN1 + KD screen mix50-ft",
        "--out", "w/s16_kdv_mix50-ft_l0.0067.pt", "--init", "w/s16_nokd_base.pt",
        "--teacher", "w/teacher_l0.0067.pt"]
    assert "s16_kdv_mix50-ft_base" not in jobs
    assert jobs["s16_kdv_mix50-base_l0.0250"].args[5:7] == ["--kd-recon", "0"]
    assert jobs["s16_kdv_mix50-base_l0.0250"].deps == ["s16_kdv_mix50_base"]
    assert jobs["s16_kdv_mix50_base"].deps == ["teacher_base"]
    assert jobs["s16_kdv_plain-seed1_base"].args[5:9] == ["--seed", "1", "--kd-recon", "0"]
    # a variant at another seed starts from the base of the student without KD of that seed
    assert jobs["s16_kdv_mix50-ft-seed1_l0.0250"].deps == ["s16_kdv_plain-seed1_base", "teacher_l0.0250"]
    assert jobs["s16_kdv_mix50-ft-seed1_l0.0250"].args[5:7] == ["--seed", "1"]


def test_kd_study_pairs_every_arm_and_puts_the_critical_path_first():
    """bench kd: the three students of a width differ only in loss weights and teacher (same steps,
    batch, crops, seed, device); the KD arms use the teacher of the same lambda; bases run first."""
    from pathlib import Path

    from licforge.bench.kd_study import plan_kd

    jobs = plan_kd(Path("w"), 40, 10, batch=16, crop=128, device="cuda")
    by = {j.name: j for j in jobs}
    kinds = [j.kind for j in jobs]
    assert kinds == sorted(kinds, key=("base", "train", "eval").index) and jobs[0].name == "teacher_base"
    assert len(jobs) == 11 * 7 + 11 * 6  # teacher + 3 arms x 3 widths + seed-1 twin, 6 evals each
    common = ["--batch", "16", "--crop", "128", "--device", "cuda", "--lmbda", "0.0067", "--steps", "10",
              "--lr", "0.001"]
    assert by["s32_nokd_l0.0067"].args == ["distill", "--N", "32", "--gdn", "gdn1", "--kd-recon", "0", *common,
                                           "--curve", "N=32 GDN1", "--out", "w/s32_nokd_l0.0067.pt",
                                           "--init", "w/s32_nokd_base.pt"]
    assert by["s32_mix50_l0.0067"].args == [
        "distill", "--N", "32", "--gdn", "gdn1", "--kd-recon", "0.5", "--kd-latent", "0.0", "--dist-weight", "0.5",
        *common, "--curve", "N=32 GDN1 + KD mix50", "--out", "w/s32_mix50_l0.0067.pt", "--init",
        "w/s32_mix50_base.pt", "--teacher", "w/teacher_l0.0067.pt"]
    assert by["s32_recon1_base"].deps == ["teacher_base"] and "40" in by["s32_recon1_base"].args
    assert by["s16_nokd_seed1_base"].args[-12:-10] == ["--seed", "1"] and by["s16_nokd_seed1_base"].deps == []
    assert "s32_nokd_seed1_base" not in by and "s16_recon1_seed1_base" not in by
    assert by["eval_s64_recon1_l0.0250"].deps == ["s64_recon1_l0.0250"]
    # several seeds: every arm at every seed, KD paired by seed, no extra twin
    by = {j.name: j for j in plan_kd(Path("w"), 40, 10, widths=(16,), seeds=(0, 1, 2))}
    assert sorted(n for n in by if n.endswith("_base")) == sorted(
        ["teacher_base"] + [f"s16_{a}{s}_base" for a in ("nokd", "recon1", "mix50") for s in ("", "_seed1", "_seed2")])
    assert by["s16_mix50_seed2_l0.0130"].deps == ["s16_mix50_seed2_base", "teacher_l0.0130"]
    assert by["s16_mix50_seed2_l0.0130"].args[-16:-14] == ["--seed", "2"]
    for bad in ({"base": 0, "ft": 10}, {"base": 40, "ft": 10, "seeds": (1, 1)}):
        with pytest.raises(ValueError, match="must be"):
            plan_kd(Path("w"), **bad)


def test_kd_study_with_given_teachers_trains_no_teacher_and_evaluates_them():
    """bench kd --teachers: the teachers are given files (one per lambda, none trained), the KD
    arms read them, every job and evaluation reads --data, and a missing lambda is refused."""
    from pathlib import Path

    from licforge.bench.kd_study import plan_kd

    given = {lam: Path(f"t/{lam}.pt") for lam in (0.0035, 0.0067, 0.013, 0.025)}
    jobs = plan_kd(Path("w"), 40, 10, widths=(16,), seeds=(0, 1), arms=("nokd", "mix50"), data="photos",
                   lambdas=(0.0035, 0.0067, 0.013, 0.025), teachers=given)
    by = {j.name: j for j in jobs}
    assert [j.name for j in jobs if j.kind == "given"] == ["teacher_base"] + [
        f"teacher_l{lam:.4f}" for lam in (0.0035, 0.0067, 0.013, 0.025)]
    assert by["teacher_base"].out == Path("t/0.013.pt") and not any(j.args[:1] == ["train"] for j in jobs)
    assert by["s16_mix50_seed1_l0.0067"].args[-2:] == ["--teacher", "t/0.0067.pt"]
    assert by["s16_mix50_base"].args[-2:] == ["--teacher", "t/0.013.pt"]
    assert "s16_recon1_base" not in by and len(jobs) == 5 + 2 * 2 * 5 + 4 + 2 * 2 * 4
    assert all(j.args[j.args.index("--data") + 1] == "photos" for j in jobs if j.kind != "given")
    assert by["eval_teacher_l0.0250"].info == {"model": "teacher_l0.0250", "teacher": True}
    pre = {j.name: j for j in plan_kd(Path("w"), 40, 10, widths=(16,), seeds=(0,), arms=("nokd", "mix50"),
                                      lambdas=(0.0035, 0.0067, 0.013, 0.025), teachers=given,
                                      kd_targets="precomputed")}
    args = pre["s16_mix50_l0.0067"].args
    assert args[args.index("--kd-targets") + 1] == "precomputed" and args[-2:] == ["--teacher", "t/0.0067.pt"]
    assert "--kd-targets" not in pre["s16_nokd_l0.0067"].args
    with pytest.raises(UsageError, match=r"--teachers: no teacher for lambda 0.0067: give one weight file per "
                                         r"lambda of --lambdas \(0.0035, 0.0067, 0.013, 0.025\)"):
        plan_kd(Path("w"), 40, 10, lambdas=(0.0035, 0.0067, 0.013, 0.025),
                teachers={k: v for k, v in given.items() if k != 0.0067})
    for arms in (("mix50",), ("nokd", "prim_m192")):
        with pytest.raises(ValueError, match=r"arms must be among .* and include each one's twin .*prim_m192: nokd_m192"):
            plan_kd(Path("w"), 40, 10, arms=arms)


def test_kd_study_from_a_trained_student_starts_every_base_there_and_refuses_another_width(capsys):
    """bench kd --student-init: every student's base model (with and without KD, every seed) starts
    from the file, its fine-tunes from their base as before, all at --student-lr; a file of another
    width or M = 192 arms are refused naming the file, and so are a missing file and lr <= 0."""
    from pathlib import Path

    from licforge.bench.kd_study import plan_kd

    student = Path(__file__).resolve().parent.parent / "models" / "checkpoints" / "student_n16_photos_l0.0130.pt"
    by = {j.name: j for j in plan_kd(Path("w"), 40, 10, widths=(16,), seeds=(0, 1), arms=("nokd", "mix50"),
                                     student_init=student, student_lr=2e-4)}
    bases = [j for j in by.values() if j.kind == "base" and j.info["role"] == "student"]
    assert sorted(j.name for j in bases) == ["s16_mix50_base", "s16_mix50_seed1_base", "s16_nokd_base",
                                            "s16_nokd_seed1_base"]
    assert all(j.args[j.args.index("--init") + 1] == str(student) for j in bases)
    ft = by["s16_mix50_seed1_l0.0067"].args
    assert ft[ft.index("--init") + 1] == str(Path("w/s16_mix50_seed1_base.pt")) and ft.count("--init") == 1
    assert all(j.args[j.args.index("--lr") + 1] == "0.0002" for j in by.values() if j.info.get("role") == "student")
    assert "--init" not in by["teacher_base"].args
    with pytest.raises(UsageError, match=r"--student-init .*student_n16_photos_l0.0130.pt: a factorized GDN1 student "
                                         r"with M = 3N/2 of the study's one width is needed \(it is N=16, M=24, "
                                         r"factorized, gdn1; --widths 16 32\): give --widths 16 or another file"):
        plan_kd(Path("w"), 40, 10, widths=(16, 32), student_init=student)
    with pytest.raises(UsageError, match=r"the arms nokd_m192, prim_m192 keep the teacher's M = 192"):
        plan_kd(Path("w"), 40, 10, widths=(16,), arms=("nokd", "nokd_m192", "prim_m192"), student_init=student)
    with pytest.raises(UsageError, match=r"--student-lr must be > 0, not 0\.0"):
        plan_kd(Path("w"), 40, 10, widths=(16,), student_lr=0.0)
    for bad, msg in ((["--student-init", "nowhere.pt"], "--student-init nowhere.pt: not found"),
                     (["--student-lr", "0"], "argument --student-lr: must be positive, not 0")):
        assert main(["bench", "kd", "--widths", "16", *bad]) == 2 and msg in capsys.readouterr().err


def test_kd_study_prim_arms_keep_the_teachers_m_and_pair_with_their_twins():
    """The PRIM arms: latent KD at weight 1/3 with precomputed reconstructions (none needed: the
    teacher's analysis transform runs per batch), the M = 192 arms pass --M 192, and every arm's
    BD figures are against its twin (nokd_m192 against nokd, prim_m192 against nokd_m192)."""
    from pathlib import Path

    from licforge.bench.kd_study import _curve, _distillation, plan_kd

    given = {lam: Path(f"t/{lam}.pt") for lam in (0.0067, 0.013)}
    arms = ("nokd", "prim", "nokd_m192", "prim_m192")
    by = {j.name: j for j in plan_kd(Path("w"), 40, 10, widths=(16,), seeds=(0, 1), arms=arms, lambdas=(0.0067, 0.013),
                                     teachers=given, kd_targets="precomputed")}
    args = by["s16_prim_m192_seed1_l0.0067"].args
    assert args[:5] == ["distill", "--N", "16", "--M", "192"] and args[args.index("--kd-latent") + 1] == "0.3333"
    assert args[args.index("--kd-recon") + 1] == "0.0" and args[-2:] == ["--teacher", "t/0.0067.pt"]
    assert "--M" not in by["s16_prim_base"].args and by["s16_nokd_m192_base"].info["M"] == 192
    assert _curve(16, "prim_m192", 1) == "N=16 M=192 GDN1 + KD prim seed 1" and _curve(16, "prim") == "N=16 GDN1 + KD prim"
    line = [(0.2, 25.0), (0.3, 26.0), (0.4, 26.8), (0.5, 27.4)]
    shift = {"nokd": 0.0, "prim": 0.1, "nokd_m192": 0.3, "prim_m192": 0.2}
    curves = {"teacher": [(r, p + 1) for r, p in line]}
    curves.update({_curve(16, a, s): [(r, p + shift[a]) for r, p in line] for a in arms for s in (0, 1)})
    d = _distillation(curves, 16, [0, 1], arms)
    assert "twin" not in d["nokd"] and [d[a]["twin"] for a in arms[1:]] == ["nokd", "nokd", "nokd_m192"]
    for arm, want in (("prim", 0.1), ("nokd_m192", 0.3), ("prim_m192", -0.1)):
        assert d[arm]["bd_psnr_vs_nokd_db"] == pytest.approx(want, abs=1e-9)


def test_kd_verdict_pairs_students_by_seed_and_gives_the_spread():
    """Each KD student is compared with the student without KD of its own seed: KD curves
    0.1/0.2/0.3 dB above their twins give BD-PSNR 0.1/0.2/0.3 per seed, mean 0.2, sd 0.1."""
    from licforge.bench.kd_study import _curve, _distillation

    base = [(0.1, 25.0), (0.2, 27.0), (0.3, 28.2), (0.4, 29.0)]
    curves = {"teacher": [(r, p + 2.0) for r, p in base]}
    for seed, (off, gain) in enumerate([(0.0, 0.1), (0.5, 0.2), (-0.3, 0.3)]):
        curves[_curve(16, "nokd", seed)] = [(r, p + off) for r, p in base]
        curves[_curve(16, "mix50", seed)] = [(r, p + off + gain) for r, p in base]
    rec = _distillation(curves, 16, [0, 1, 2], ("nokd", "mix50"))["mix50"]
    assert [round(v["bd_psnr_vs_nokd_db"], 9) for v in rec["seeds"].values()] == [0.1, 0.2, 0.3]
    assert rec["bd_psnr_vs_nokd_db"] == pytest.approx(0.2, abs=1e-9)
    spread = rec["spread"]["bd_psnr_vs_nokd_db"]
    assert spread["min"] == pytest.approx(0.1) and spread["max"] == pytest.approx(0.3)
    assert spread["sd"] == pytest.approx(0.1, abs=1e-9)
    assert rec["bd_rate_vs_nokd_pct"] < 0 and rec["spread"]["bd_rate_vs_nokd_pct"]["max"] < 0


def test_cli_device_is_checked_before_training(tmp_path, capsys):
    cmd = ["distill", "--kd-recon", "0", "--steps", "1", "--out", str(tmp_path / "s.pt")]
    rc = main(cmd + ["--device", "tpu"])
    assert rc == 2 and "--device 'tpu': not a device; use cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = main(cmd + ["--device", "cuda"])
        assert rc == 2 and "sees no CUDA GPU on this machine; train with --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_crop_sampler_keeps_its_crops_and_cuts_them_on_the_device(train_images, device):
    """The crops of seed 5 are those of the sampler before it learnt devices (sums of its first
    three 4x32x32 batches); a sampler on ``device`` yields them there, its ``part``s put together
    are the whole batch, and state/restore resumes it exactly."""
    plain = CropSampler(train_images, 32, 4, seed=5)
    on_dev = CropSampler(train_images, 32, 4, seed=5, device=device)
    halves = [CropSampler(train_images, 32, 4, seed=5, device=device) for _ in range(2)]
    sums = []
    for _ in range(3):
        want, got = plain(), on_dev()
        assert got.device.type == device and got.dtype == torch.float32
        assert torch.equal(got.cpu(), want)
        assert torch.equal(torch.cat([h(part=(r, 2)) for r, h in enumerate(halves)]).cpu(), want)
        sums.append(int((want * 256).round().sum()))
    assert sums == [428514, 296864, 523475]
    saved = on_dev.state()
    after = [on_dev() for _ in range(2)]
    back = CropSampler(train_images, 32, 4, seed=99, device=device)
    back.restore(saved)
    assert all(torch.equal(a, back()) for a in after)
    with pytest.raises(ValueError, match="does not split into 3"):
        on_dev(part=(0, 3))


def test_aux_step_trains_the_quantiles_only(train_images):
    """The quantiles do not enter the training-mode forward: with and without the aux step
    (aux_lr 0) every other weight and every loss term is bit-identical; the aux loss falls."""
    cfg, runs = student_config(4), {}
    for aux_lr in (1e-3, 0.0):
        torch.manual_seed(3)
        net = build_lic(cfg)
        q0 = net.entropy_bottleneck.quantiles.detach().clone()
        tcfg = TrainConfig(steps=4, crop=32, batch=2, seed=3, aux_lr=aux_lr)
        hist = train_lic(net, CropSampler(train_images, 32, 2, 3), tcfg, arch={}, log_every=1, log=None)["history"]
        runs[aux_lr] = (net.state_dict(), hist, q0)
    (a, ha, q0), (b, hb, _) = runs[1e-3], runs[0.0]
    assert torch.equal(b["entropy_bottleneck.quantiles"], q0)
    assert not torch.equal(a["entropy_bottleneck.quantiles"], q0)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "entropy_bottleneck.quantiles")
    assert [{k: v for k, v in h.items() if k != "aux"} for h in ha] == hb
    assert "aux" not in hb[0] and ha[-1]["aux"] < ha[0]["aux"]


def test_bf16_autocast_runs_the_transforms_in_bf16_and_the_losses_in_fp32(train_images):
    """amp on the CPU (torch.autocast("cpu", bfloat16)): g_s yields bf16, the entropy bottleneck
    fp32 likelihoods; 3 steps of a distilled student give finite loss terms within 1 % (relative)
    of the fp32 run's (measured: < 0.1 %)."""
    torch.manual_seed(1)
    teacher = build_lic(student_config(8, gdn="gdn"))
    runs = {}
    for amp in (False, True):
        torch.manual_seed(3)
        net, seen = build_lic(student_config(4)), {}
        net.entropy_bottleneck.register_forward_hook(lambda m, i, o: seen.update(lik=o[1].dtype))
        net.g_s[0].register_forward_hook(lambda m, i, o: seen.update(g_s=o.dtype))
        tcfg = TrainConfig(steps=3, crop=32, batch=2, seed=3, kd_recon=0.5, kd_latent=0.5, amp=amp)
        runs[amp] = train_lic(net, CropSampler(train_images, 32, 2, 3), tcfg, arch={}, teacher=teacher, teacher_m=12,
                              log_every=1, log=None)["history"]
        assert seen == {"lik": torch.float32, "g_s": torch.bfloat16 if amp else torch.float32}
    for f, b in zip(runs[False], runs[True]):
        assert f.keys() == b.keys() >= {"loss", "bpp", "mse", "kd_recon", "kd_latent", "aux"}
        assert all(math.isfinite(v) for v in b.values())
        assert b == pytest.approx(f, rel=1e-2)
    assert "forward" not in vars(teacher.entropy_bottleneck)  # the fp32 override is gone after training


def test_state_files_without_the_new_settings_resume(train_images, tmp_path):
    """A state file written before aux_lr/amp/optimizer/noise existed (no such keys, no aux
    optimiser) resumes when they are at their defaults, and is refused for another value."""
    cfg, tcfg = student_config(4), TrainConfig(steps=4, crop=32, batch=2, seed=3)
    state = tmp_path / "s.state.pt"
    with pytest.raises(Interrupt):
        _run(train_images, cfg, tcfg, state, stop_after=3)
    st = torch.load(state, weights_only=True)
    for k in ("aux_lr", "amp", "optimizer", "noise"):
        del st["train"][k]
    del st["aux_optimizer"]
    torch.save(st, state)
    resumed = _run(train_images, cfg, tcfg, state, resume=True)
    assert torch.load(state, weights_only=True)["step"] == 4 and resumed.training is False
    with pytest.raises(CheckpointError, match=r"other settings .*'amp': \(False, True\)"):
        _run(train_images, cfg, TrainConfig(steps=4, crop=32, batch=2, seed=3, amp=True), state, resume=True)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd'"):
        TrainConfig(optimizer="lamb")


def test_cli_bf16_trains_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "s.pt"
    rc = main(["train", "--N", "8", "--gdn", "gdn1", "--crop", "16", "--batch", "2", "--steps", "2", "--bf16",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = load_weights(out)[2]
    assert meta["train"]["amp"] is True and meta["train"]["noise"] == "global" and meta["processes"] == 1
    assert " aux " in capsys.readouterr().out


def test_kd_study_evaluates_every_model_on_more_held_out_sets(tmp_path):
    """bench kd --eval-data: one more eval job per model and set (the first with the Pillow
    baselines), and the set's verdict from its own evaluations: the given teachers as one curve,
    the baselines kept, each KD arm against its twin."""
    import json

    from licforge.bench.kd_study import _curve, _verdict, plan_kd

    lams = (0.0035, 0.0067, 0.013, 0.025)
    given = {lam: tmp_path / f"t{lam}.pt" for lam in lams}
    jobs = plan_kd(tmp_path / "w", 40, 10, widths=(16,), seeds=(0, 1), arms=("nokd", "mix50"), lambdas=lams,
                   teachers=given, data="photos", eval_sets={"kde": "/data/kde"})
    ev = [j for j in jobs if j.name.startswith("eval_kde_")]
    assert len(ev) == len([j for j in jobs if j.kind == "eval"]) // 2 == 4 + 2 * 2 * 4
    assert "--no-baselines" not in ev[0].args and all("--no-baselines" in j.args for j in ev[1:])
    assert all(j.args[j.args.index("--data") + 1] == "/data/kde" and j.info["set"] == "kde" for j in ev)
    assert ev[0].out == tmp_path / "w" / "eval_kde" / "teacher_l0.0035.json"
    gain = {"nokd": 0.0, "mix50": 0.25}
    for j in ev:
        m, lam = j.info["model"], float(j.info["model"].rsplit("_l", 1)[1])
        arm = "teacher" if j.info["teacher"] else ("mix50" if "mix50" in m else "nokd")
        curve = "factorized_N128" if arm == "teacher" else _curve(16, arm, 1 if "seed1" in m else 0)
        psnr = 24 + 100 * lam + (2 if arm == "teacher" else gain[arm])
        entries = [{"curve": curve, "kind": "float", "mean": {"bpp": 0.1 + 10 * lam, "psnr": psnr}}]
        if "--no-baselines" not in j.args:
            entries += [{"curve": "JPEG (Pillow)", "kind": "baseline", "mean": {"bpp": b, "psnr": 20 + 20 * b}}
                        for b in (0.1, 0.2, 0.3, 0.4, 0.5)]
        j.out.parent.mkdir(parents=True, exist_ok=True)
        j.out.write_text(json.dumps({"entries": entries}))
    evals, curves, dist, noise = _verdict(jobs, "kde", (16,), (0, 1), ("nokd", "mix50"))
    assert sorted(curves) == ["JPEG (Pillow)", "N=16 GDN1", "N=16 GDN1 + KD mix50", "N=16 GDN1 + KD mix50 seed 1",
                              "N=16 GDN1 seed 1", "teacher"]
    assert len(curves["teacher"]) == 4 and len(curves["JPEG (Pillow)"]) == 5 and len(evals) == 4 + 16
    assert dist["N=16"]["mix50"]["bd_psnr_vs_nokd_db"] == pytest.approx(0.25, abs=1e-9)
    assert dist["N=16"]["nokd"]["bd_psnr_vs_teacher_db"] == pytest.approx(-2, abs=1e-9)
    assert noise[0]["pair"] == ["N=16 GDN1", "N=16 GDN1 seed 1"] and noise[0]["bd_psnr_db"] == pytest.approx(0, abs=1e-9)


def test_bench_kd_refuses_missing_or_same_named_eval_folders(tmp_path, capsys):
    for sub in ("a/kde", "b/kde"):
        (tmp_path / sub).mkdir(parents=True)
    assert main(["bench", "kd", "--eval-data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert f"--eval-data {tmp_path / 'none'}: not found (or not a directory)" in capsys.readouterr().err
    assert main(["bench", "kd", "--eval-data", str(tmp_path / "a/kde"), str(tmp_path / "b/kde"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--eval-data: the folders' names must differ (they name the result files)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_jobs_resume_an_interrupted_training_run_of_the_same_arguments(tmp_path):
    """A training job started with the same arguments (its start stamp), interrupted after its
    state file was written, continues with --resume; not when its arguments changed, when a job
    it depends on ran again, without a state file, or for a job that is not a training run."""
    import json

    from licforge.bench.lic import Job, _resumable, _stamp

    job = Job("s", ["distill", "--N", "4", "--out", str(tmp_path / "s.pt")], tmp_path / "s.pt", ["base"], "train", {})
    assert not _resumable(job, set())
    _stamp(job, "start").write_text(json.dumps({"args": job.args}))
    assert not _resumable(job, set())                       # no state file yet
    (tmp_path / "s.state.pt").write_bytes(b"state")
    assert _resumable(job, set()) and not _resumable(job, {"base"})
    changed = Job("s", job.args[:-1] + [str(tmp_path / "s.pt"), "--steps", "9"], job.out, ["base"], "train", {})
    assert not _resumable(changed, set())
    ev = Job("e", ["eval", "x.pt"], tmp_path / "s.pt", [], "eval", {})
    _stamp(ev, "start").write_text(json.dumps({"args": ev.args}))
    assert not _resumable(ev, set())
    assert _stamp(job).name == "s.pt.cmd.json" and _stamp(job, "start").name == "s.pt.start.json"


def test_ema_returns_the_moving_average_and_resumes_exactly(train_images, tmp_path):
    """With ``ema`` the weights returned are avg_t = lerp(avg_{t-1}, w_t, 1 - min(ema, (1+t)/(10+t)))
    of the weights w_t after each step (avg_0 the initial weights), entry by entry; the state
    file keeps the average, so an interrupted run resumes to the same average."""
    cfg, tcfg = student_config(4), TrainConfig(steps=5, crop=32, batch=2, seed=3, ema=0.6)
    torch.manual_seed(tcfg.seed)
    net = build_lic(cfg)
    avg = {k: v.clone() for k, v in net.state_dict().items()}
    raw: list[dict[str, torch.Tensor]] = []

    def record(n):
        raw.append({k: v.detach().clone() for k, v in n.state_dict().items()})
        t = len(raw)
        for k, v in raw[-1].items():
            avg[k] = torch.lerp(avg[k], v, 1 - min(0.6, (1 + t) / (10 + t))) if v.is_floating_point() else v

    train_lic(net, CropSampler(train_images, tcfg.crop, tcfg.batch, tcfg.seed), tcfg, arch=cfg.to_dict(),
              after_step=record, state_path=tmp_path / "a.state.pt", log=None)
    got = net.state_dict()
    assert len(raw) == 5 and got.keys() == avg.keys()
    assert all(torch.equal(got[k], avg[k]) for k in got)
    assert not torch.equal(got["g_s.0.weight"], raw[-1]["g_s.0.weight"])   # the average, not the last step
    state = torch.load(tmp_path / "a.state.pt", weights_only=True)
    assert torch.equal(state["model"]["g_s.0.weight"], raw[-1]["g_s.0.weight"])
    assert torch.equal(state["ema"]["g_s.0.weight"], avg["g_s.0.weight"])

    with pytest.raises(Interrupt):
        _run(train_images, cfg, tcfg, tmp_path / "b.state.pt", stop_after=3)
    resumed = _run(train_images, cfg, tcfg, tmp_path / "b.state.pt", resume=True).state_dict()
    assert all(torch.equal(resumed[k], avg[k]) for k in avg)
    with pytest.raises(CheckpointError, match=r"other settings .*'ema': \(0\.6, 0\.0\)"):
        _run(train_images, cfg, TrainConfig(steps=5, crop=32, batch=2, seed=3), tmp_path / "b.state.pt", resume=True)
    assert "ema" not in TrainConfig().to_dict() and TrainConfig(ema=0.999).to_dict()["ema"] == 0.999


def test_ema_outside_0_1_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"ema must be a decay in \[0, 1\) \(0 = off, e\.g\. 0\.999\), not 1\.0"):
        TrainConfig(ema=1.0)
    rc = main(["train", "--N", "8", "--gdn", "gdn1", "--steps", "1", "--ema", "-0.5", "--out", str(tmp_path / "s.pt")])
    assert rc == 2 and "--ema must be a decay in [0, 1) (0 = off, e.g. 0.999), not -0.5" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


def test_a_step_with_non_finite_gradients_is_skipped_and_a_run_of_them_stops(train_images, tmp_path):
    """A NaN loss (here from ``extra_loss``) leaves the weights as they were and is counted in the
    log instead of turning every weight into NaN; MAX_SKIPPED_IN_A_ROW such steps stop the run."""
    from licforge.models.lic_train import MAX_SKIPPED_IN_A_ROW

    cfg, tcfg = student_config(4), TrainConfig(steps=4, crop=32, batch=2, seed=3)
    calls: list[int] = []
    raw: list[dict[str, torch.Tensor]] = []

    def nan_at(steps):
        def extra(n):
            calls.append(1)
            return n.g_s[0].weight.sum() * (math.nan if len(calls) in steps else 0.0)   # NaN gradients
        return extra

    torch.manual_seed(tcfg.seed)
    net = build_lic(cfg)
    logged: list[str] = []
    rec = train_lic(net, CropSampler(train_images, tcfg.crop, tcfg.batch, tcfg.seed), tcfg, arch=cfg.to_dict(),
                    extra_loss=nan_at({2}), after_step=lambda n: raw.append({k: v.clone() for k, v in n.state_dict().items()}),
                    log_every=2, log=logged.append)
    assert all(torch.equal(raw[1][k], raw[0][k]) for k in raw[0])          # step 2 changed nothing
    assert not torch.equal(raw[2]["g_s.0.weight"], raw[1]["g_s.0.weight"])  # step 3 trained again
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())
    first, second = rec["history"]
    assert first["skipped"] == 1 and math.isfinite(first["loss"]) and "skipped" not in second
    assert "skipped 1 steps (non-finite gradients)" in logged[0] and "skipped" not in logged[1]

    calls.clear()
    state = tmp_path / "s.state.pt"
    with pytest.raises(FloatingPointError, match=rf"steps 2-{MAX_SKIPPED_IN_A_ROW + 1} all gave non-finite gradients "
                                                 r"and were skipped; the weights are still those of step 1"):
        train_lic(build_lic(cfg), CropSampler(train_images, tcfg.crop, tcfg.batch, tcfg.seed),
                  TrainConfig(steps=40, crop=32, batch=2, seed=3), arch=cfg.to_dict(),
                  extra_loss=nan_at(set(range(2, 100))), state_path=state, save_every=5, log=None)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 20 and all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
