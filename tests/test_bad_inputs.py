"""Issue 14, artifacts and attach: errors never look like answers (tiny random models built here).

* the fingerprint identifies the weights whatever their dtype (float32 = bfloat16 load) and sees every tensor
  (a middle MLP, the LM head), and says what differs; format-1 artifacts are refused with the upgrade named;
* a damaged ``retrofit.json`` / tensor file is an ArtifactError saying what is wrong, never a TypeError;
* config values not of their type are refused for every method's config; changing ``h.config`` after attach
  is validated (the benchmark's ``handle.config.skip_bias = float(x)`` keeps working);
* non-finite hidden states entering a routed layer stop Dr.LLM with the layer named instead of reading as "skip".
"""

import copy
import dataclasses
import json
import re
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

import retrofit
from retrofit.artifacts import CONFIG_NAME, TENSORS_NAME, ArtifactError, fingerprint, load_artifact
from retrofit.testing import tiny_model


def _saved(tmp_path, family="llama", **kw):
    model = tiny_model(family, **kw)
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=0)
    h.save(tmp_path / "r")
    h.detach()
    return model, tmp_path / "r"


# ---------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_same_weights_in_bfloat16_match(tmp_path):
    model, path = _saved(tmp_path)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert fingerprint(bf16) == fingerprint(model)
    h = retrofit.load(bf16, path)  # the same SmolLM2-like weights in bf16 are the same base model
    with torch.no_grad():
        bf16(torch.randint(3, 128, (2, 9)))
    assert h.stats()["sequences"] == 2
    h.detach()


@pytest.mark.parametrize("where", ["mlp", "head", "norm"])
def test_fingerprint_sees_a_changed_middle_mlp_head_or_norm(tmp_path, where):
    model, path = _saved(tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        if where == "mlp":
            other.model.layers[2].mlp.down_proj.weight.mul_(1.05)
        elif where == "head":
            other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 0.01)
        else:
            other.model.norm.weight.add_(0.1)
    assert fingerprint(other)["weights_sha256"] != fingerprint(model)["weights_sha256"]
    what = "decoder layer 2" if where == "mlp" else "the embedding / final norm / LM head"
    with pytest.raises(ArtifactError, match=f"another base model.*weights differ in {what}"):
        retrofit.load(other, path)


def test_fingerprint_from_checkpoint_names_equals_the_models_also_when_tied():
    """What the vLLM plugin computes from the checkpoint tensors it loads (every HF name, a tied LM head
    possibly saved twice, rotary buffers) equals fingerprint(model)."""
    from retrofit.artifacts import fingerprint_of, tensor_digest

    for tied in (False, True):
        model = tiny_model("qwen2", tie_word_embeddings=tied)
        sd = dict(model.state_dict())
        sd["lm_head.weight"] = model.lm_head.weight  # present in the checkpoint even when tied
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        digests = {n: tensor_digest(t.to(torch.bfloat16)) for n, t in sd.items()}
        assert fingerprint_of(type(model).__name__, model.config, 4, digests) == fingerprint(model)


def test_old_format_artifact_is_refused_with_the_upgrade_named(tmp_path):
    from retrofit.artifacts import _fingerprint_v1, upgrade_artifact

    model, path = _saved(tmp_path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta.update(format_version=1, base_model=_fingerprint_v1(model))
    meta.pop("tensors")
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"older retrofit.*upgrade_artifact"):
        retrofit.load(model, path)
    with pytest.raises(ArtifactError, match=r"older retrofit.*upgrade_artifact"):
        load_artifact(path)  # also without a model (a server reads it before the weights are loaded)
    meta.pop("extra", None)  # format-1 files may lack it
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError) as e:
        upgrade_artifact(path, tiny_model("llama", seed=3))
    assert str(e.value).endswith("upgrade it on the model it was trained for, loaded in float32.")
    assert "another base model (format-1 fingerprint differs in ['weights_sha256'])" in str(e.value)
    upgrade_artifact(path, model)
    text = (path / CONFIG_NAME).read_text()
    new = json.loads(text)
    assert new["format_version"] == 2 and new["extra"] == {}
    retrofit.load(model, path).detach()
    assert upgrade_artifact(path, model) == path and (path / CONFIG_NAME).read_text() == text  # current: untouched


# ---------------------------------------------------------------------------------------------- damaged files
def _edit_meta(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta = fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


DAMAGED_META = {
    "method foo": (lambda m: {**m, "method": "foo"}, "not a retrofit method"),
    "method null": (lambda m: {**m, "method": None}, "method must be"),
    "a list": (lambda m: [m], "must be a JSON object, not a list"),
    "format_version '1'": (lambda m: {**m, "format_version": "1"}, "format_version must be a positive integer"),
    "base_model null": (lambda m: {**m, "base_model": None}, "base_model must be"),
    "base_model list": (lambda m: {**m, "base_model": []}, "base_model must be"),
    "num_layers str": (lambda m: {**m, "base_model": {**m["base_model"], "num_layers": "4"}},
                       "base_model.num_layers must be an integer"),
    "config null": (lambda m: {**m, "config": None}, "config must be an object"),
    "config bad value": (lambda m: {**m, "config": {**m["config"], "num_windows": True}}, "config is invalid"),
    "config unknown key": (lambda m: {**m, "config": {**m["config"], "windows": 3}}, "config is invalid"),
    "extra list": (lambda m: {**m, "extra": []}, "extra must be an object"),
    "no tensors manifest": (lambda m: {k: v for k, v in m.items() if k != "tensors"}, "tensors must be"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_META))
def test_damaged_meta_is_an_artifact_error_saying_what_is_wrong(tmp_path, case):
    model, path = _saved(tmp_path)
    fn, msg = DAMAGED_META[case]
    _edit_meta(path, fn)
    with pytest.raises(ArtifactError, match=msg):
        retrofit.load(model, path)


def test_empty_or_foreign_tensor_files_and_int_routers_are_refused(tmp_path):
    model, path = _saved(tmp_path)
    good = load_file(str(path / TENSORS_NAME))
    save_file({}, str(path / TENSORS_NAME))  # a valid safetensors file with no tensors
    with pytest.raises(ArtifactError, match="does not hold the tensors.*missing"):
        retrofit.load(model, path)
    (path / TENSORS_NAME).write_bytes(b"")  # an empty file
    with pytest.raises(ArtifactError, match="could not be read"):
        retrofit.load(model, path)
    ints = {k: v.round().to(torch.int64) for k, v in good.items()}
    save_file(ints, str(path / TENSORS_NAME))
    with pytest.raises(ArtifactError, match="another shape/dtype"):
        retrofit.load(model, path)
    _edit_meta(path, lambda m: {**m, "tensors": {k: {**s, "dtype": "int64"} for k, s in m["tensors"].items()}})
    with pytest.raises(ArtifactError, match="must be floating point"):  # even when the manifest agrees
        retrofit.load(model, path)
    assert all(p.requires_grad is True or p.requires_grad is False for p in model.parameters())


# ---------------------------------------------------------------------------------------------- configs
def _config_classes():
    from retrofit.methods import available_methods, get_method

    return [get_method(k).config_cls for k in available_methods()]


_WRONG = {bool: ["no", 1, None], int: [True, 2.0, "3", None], float: ["0.5", False, None], str: [1, None, True]}


def _wrong_values():
    out = []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            optional = typing.get_origin(tp) is not None and type(None) in typing.get_args(tp)
            base = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if optional else tp
            for v in _WRONG.get(base, []):
                if not (optional and v is None):
                    out.append(pytest.param(cls, f.name, v, id=f"{cls.__name__}.{f.name}={v!r}"))
    return out


@pytest.mark.parametrize("cls,name,value", _wrong_values())
def test_config_values_not_of_their_type_are_refused(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})
    cfg = cls()
    before = dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match=name):
        setattr(cfg, name, value)
    assert dataclasses.asdict(cfg) == before


def test_changing_the_config_after_attach_is_validated():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=0)
    ids = torch.randint(3, 128, (2, 9))
    for bad, msg in ((("skip_bias", float("nan")), "finite"), (("plan", ["skip"] * 3), "3 entries|4"),
                     (("plan", ["jump"] * 4), "unknown plan actions"), (("num_windows", True), "integer"),
                     (("bottleneck", 16), "fixed by the attached routers"), (("skip_bais", 1.0), "no option")):
        with pytest.raises((ValueError, AttributeError), match=msg):
            setattr(h.config, *bad)
    assert h.config.skip_bias == 0.0 and h.config.plan is None
    h.config.skip_bias = float(1e4)  # what the benchmarks do: a valid change takes effect at the next prefill
    with torch.no_grad():
        model(ids)
    assert h.last_plans == [["skip"] * 4] * 2
    h.config.skip_bias = 0.0
    h.config.plan = ["execute", "skip", "execute", "execute"]
    with torch.no_grad():
        model(ids)
    assert h.last_plans[0] == ["execute", "skip", "execute", "execute"]
    h.detach()
    h.config.plan = ["execute"] * 7  # detached: no model to check the length against; the values still are
    with pytest.raises(ValueError):
        h.config.skip_bias = float("inf")
    assert copy.deepcopy(h.config) == h.config


# ---------------------------------------------------------------------------------------------- NaN
def test_nan_hidden_states_stop_the_routers_naming_the_layer():
    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=8, skip_bias=-1e4, repeat_bias=-1e4)  # routers execute all
    h.init_routers(seed=0)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        model(ids)
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="entering decoder layer 2 hold NaN or inf"):
            model(ids)
    assert h.stats()["sequences"] == 2  # the failed request is not counted as a saving
    h.set_plan(["execute"] * 4)  # no router decides: the plan runs as given (no check, no cost)
    with torch.no_grad():
        assert torch.isnan(model(ids).logits).all()
    h.detach()


def test_a_prefill_that_failed_leaves_no_request_behind():
    """A prefill that raised before any layer wrote to the cache the caller holds (NaN input embeddings: layer 0's
    router refuses them): the retry on that still empty cache is a new request that routes and runs, equal to a
    fresh cache, not a decode step of the failed one."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=0)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        want = model(ids, past_key_values=DynamicCache()).logits
        plans = h.last_plans
        emb = model.get_input_embeddings()(ids)
        cache = DynamicCache()
        with pytest.raises(FloatingPointError, match="entering decoder layer 0 hold NaN or inf"):
            model(inputs_embeds=emb.masked_fill(ids[..., None] == ids[0, 0], float("nan")), past_key_values=cache)
        assert cache.get_seq_length() == 0
        assert h.last_plans == plans  # the last finished request's plans, not the failed one's
        got = model(ids, past_key_values=cache).logits
    assert torch.equal(got, want) and cache.get_seq_length() == 9
    assert h.stats()["sequences"] == 4  # the two good prefills; the failed one is not counted
    h.detach()


# ---------------------------------------------------------------------------------------------- evaluation
# (no model is loaded or run here: every check below happens before lm-eval starts)
class _MustNotRun:
    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name})")


def _arc_easy(folder, validation_lines):
    good = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["air", "rock"], "label": ["A", "B"]},
            "answerKey": "A"}
    (folder / "arc_easy").mkdir(parents=True)
    for split in ("train", "test"):
        (folder / "arc_easy" / f"{split}.jsonl").write_text(json.dumps(good) + "\n")
    (folder / "arc_easy" / "validation.jsonl").write_text("".join(x + "\n" for x in validation_lines))
    return json.dumps(good)


def _cli(args, env=None):
    """Run the CLI; ``.output`` with rich's error box and line wrapping removed (``.raw`` keeps them)."""
    from typer.testing import CliRunner

    from retrofit.cli import app

    res = CliRunner().invoke(app, args, env={"COLUMNS": "250", **(env or {})}, terminal_width=250)
    return type("Res", (), {"exit_code": res.exit_code, "exception": res.exception, "raw": res.output,
                            "output": re.sub(r"[│╭╮╰╯─]|\s+", " ", res.output)})


def test_eval_default_run_names_carry_routers_limit_and_model():
    from retrofit.eval.runner import _default_name

    names = {_default_name("drllm", {}, routers=r, limit=lim, model=m)
             for r in (None, "routers/a", "x/b") for lim in (None, 20, 40) for m in ("default", "/m/other")}
    assert len(names) == 18
    plans = {_default_name("drllm", {"plan": p}) for p in (["skip", "execute"], ["execute", "skip"])}
    assert len(plans) == 2


def test_eval_refuses_to_overwrite_another_run(tmp_path, shared_data):
    from retrofit.eval.runner import RunExistsError, evaluate

    old = {"run": "mine", "model": "default", "method": "drllm", "routers": "routers/a", "config": {}, "limit": 20,
           "tasks": {"retrofit_arc_easy_val": {"acc": 0.5}}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(old))
    for changed in ({"routers": "routers/b", "limit": 20}, {"routers": "routers/a", "limit": 40}):
        with pytest.raises(RunExistsError, match=r"another run \(.*--overwrite"):
            evaluate("arc_easy_val", method="drllm", out=tmp_path, name="mine", lm=_MustNotRun(), progress=False,
                     data=shared_data, **changed)
    assert json.loads(path.read_text()) == old  # nothing lost
    same = evaluate("arc_easy_val", method="drllm", routers="routers/a", limit=20, out=tmp_path, name="mine",
                    lm=_MustNotRun(), progress=False, data=shared_data)
    assert same["tasks"] == old["tasks"]  # the same run: resumed, not re-run
    res = _cli(["eval", "--tasks", "arc_easy_val", "--method", "drllm", "--routers", "routers/b", "--limit", "20",
                "--name", "mine", "--out", str(tmp_path), "--data", str(shared_data), "--no-plot"])
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.raw, res.raw
    assert json.loads(path.read_text()) == old


@pytest.mark.parametrize("bad,where", [
    ('{"id": "q2", "question": "x"', "validation.jsonl:2: not valid JSON"),
    ('{"id": "q2", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}',
     "validation.jsonl:2: missing field 'question'"),
    ('[1, 2]', "validation.jsonl:2: expected a JSON object"),
    (None, "validation.jsonl: no examples"),
])
def test_eval_malformed_split_files_name_file_and_line(tmp_path, bad, where):
    from retrofit.core.data import TaskDataError
    from retrofit.eval.runner import evaluate

    data = tmp_path / "data"
    good = _arc_easy(data, [] if bad is None else ["", bad])
    if bad is not None:
        (data / "arc_easy" / "validation.jsonl").write_text(good + "\n" + bad + "\n")
    with pytest.raises(TaskDataError, match=where.replace("(", r"\(")):
        evaluate("arc_easy_val", data=data, lm=_MustNotRun(), progress=False)
    res = _cli(["eval", "--tasks", "arc_easy_val", "--data", str(data), "--out", str(tmp_path / "o"), "--no-plot"])
    assert res.exit_code == 2 and where.split(":")[0] in res.output and "Traceback" not in res.output, res.output


def test_eval_missing_data_folder_is_one_line(tmp_path):
    res = _cli(["eval", "--tasks", "arc_easy", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                "--no-plot"])
    assert res.exit_code == 2 and "data folder not found" in res.output, res.output


def test_lm_eval_defaults_to_the_device_that_exists(monkeypatch):
    import sys

    import lm_eval.__main__

    seen = {}
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    res = _cli(["lm-eval", "run", "--model", "retrofit", "--tasks", "retrofit_arc_easy", "--limit", "2"])
    assert res.exit_code == 0, res.output
    argv = seen["argv"]
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert argv[argv.index("--device") + 1] == want and "--include_path" in argv
    if not torch.cuda.is_available():
        res = _cli(["lm-eval", "run", "--model", "retrofit", "--tasks", "retrofit_arc_easy", "--device", "cuda"])
        assert res.exit_code == 2 and "no CUDA device" in res.output, res.output


def test_lm_eval_table_gets_the_layers_executed():
    from retrofit.eval.cli import add_compute_metrics

    class LM:
        def compute_metrics(self, task):
            n = 3 if task == "retrofit_arc_easy" else 0
            return {"prompts": n, "mean_layers_executed": 24.5, "layer_fraction": 24.5 / 30, "num_layers": 30}

    res = {"results": {"retrofit_arc_easy": {"acc,none": 0.5}, "other": {"acc,none": 0.1}}}
    add_compute_metrics(res, [LM()])
    assert res["results"]["retrofit_arc_easy"]["mean_layers_executed,none"] == 24.5
    assert "mean_layers_executed,none" not in res["results"]["other"]


def test_misa_distill_honours_retrofit_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/data relative to here does not exist
    res = _cli(["misa", "distill", "--steps", "1"], env={"RETROFIT_DATA": str(tmp_path / "mydata")})
    flat = res.output.replace(" ", "")
    assert res.exit_code == 2 and str(tmp_path / "mydata" / "tinyshakespeare") in flat, res.raw


@pytest.mark.parametrize("args,msg", [
    (["--method", "drllm", "--set", "num_windows=true"], "DrLLMConfig.num_windows must be an integer"),
    (["--method", "drllm", "--set", "allow_repeat=no"], "DrLLMConfig.allow_repeat must be True or False"),
    (["--method", "drllm", "--set", "windows=3"], "unknown option"),
    (["--method", "foo"], "unknown method 'foo'"),
])
def test_eval_config_mistakes_are_one_line_errors(tmp_path, args, msg):
    res = _cli(["eval", "--tasks", "arc_easy", "--out", str(tmp_path), "--no-plot", *args])
    assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.raw, res.raw


# ---------------------------------------------------------------------------------------------- serving
# (the server-side ones, HTTP 400 from a running server, are in tests/test_vllm_serve.py)


def _model_folder(tmp_path, family="llama", seed=0, **kw):
    """A tiny model saved as a Hugging Face folder (what `retrofit serve --model` takes)."""
    model = tiny_model(family, seed=seed, **kw)
    folder = tmp_path / f"{family}-{seed}"
    model.save_pretrained(folder)
    return model, folder


def _serve(args):
    return _cli(["serve", "--dry-run", *args])


def test_serve_request_arguments_that_look_like_ours_or_do_not_fit_are_refused():
    from retrofit.serve.config import ServeConfigError, parse_request_args, parse_serve_config

    cfg = parse_serve_config({"artifacts": {"arc": "p"}, "allow_request_plans": True, "num_layers": 30})
    for args, msg in [({"retrofitt": "arc"}, "did you mean 'retrofit'"),
                      ({"retrofit_plans": "e" * 30}, "did you mean 'retrofit_plan'"),
                      ({"Retrofit-Plan": "e" * 30}, "did you mean 'retrofit_plan'"),
                      ({"retrofit": "arcc"}, r"unknown retrofit artifact 'arcc'; this server has \['arc'\]"),
                      ({"retrofit_plan": "ee"}, "2 entries but the model has 30 decoder layers"),
                      ({"retrofit_plan": ""}, "plan string is empty"),
                      ({"retrofit_plan": []}, "0 entries but the model has 30")]:
        with pytest.raises(ServeConfigError, match=msg):
            parse_request_args(args, cfg)
    assert parse_request_args({"retrofit": "arc", "top_k_extra": 1}, cfg).name == "arc"  # others' keys pass
    static = parse_serve_config({"plan": "es"})
    for args in ({"retrofit": "arc"}, {"retrofit": "none"}, {"retrofit_plan": "ee"}):
        with pytest.raises(ServeConfigError, match="one static plan for every request"):
            parse_request_args(args, static)
    with pytest.raises(ServeConfigError, match="plan has 2 entries but the model has 3"):
        parse_serve_config({"plan": "es", "num_layers": 3})
    with pytest.raises(ServeConfigError, match="num_layers must be a positive integer"):
        parse_serve_config({"plan": "es", "num_layers": "2"})


def test_serve_front_end_reads_the_config_from_the_servers_hf_overrides(tmp_path, monkeypatch):
    """The API front end never sees the model config: it reads the serve config from the api_server's own
    --hf-overrides (as `retrofit serve` passes it) and the layer count from --model, so an unknown name or a
    wrong-length plan is a 400 there, not an empty answer from the worker."""
    from retrofit.serve.config import ENV, frontend_serve_config, is_vllm_server

    monkeypatch.delenv(ENV, raising=False)
    _, folder = _model_folder(tmp_path)
    server = "/x/site-packages/vllm/entrypoints/openai/api_server.py"
    ov = json.dumps({"architectures": ["RetrofitLlamaForCausalLM"],
                     "retrofit": {"artifacts": {"arc": "p"}, "allow_request_plans": True}})
    for argv in ([server, "--model", str(folder), "--hf-overrides", ov],
                 [server, f"--hf-overrides={ov}", "--model", str(folder)],
                 ["/venv/bin/vllm", "serve", str(folder), "--hf-overrides", ov]):
        assert is_vllm_server(argv)
        cfg, source = frontend_serve_config(argv)
        assert source == "--hf-overrides" and sorted(cfg.artifacts) == ["arc"] and cfg.num_layers == 4, argv
    assert frontend_serve_config(["script.py", "--hf-overrides", ov]) == (None, "")  # not a server: not ours
    assert not is_vllm_server(["script.py"])


def test_serve_front_end_refuses_what_the_server_would_ignore(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    import sys
    from types import SimpleNamespace

    from retrofit.serve import vllm_state
    from retrofit.serve.config import ENV, ServeConfigError

    monkeypatch.delenv(ENV, raising=False)
    server = "/x/site-packages/vllm/entrypoints/openai/api_server.py"

    def check(argv, args):
        monkeypatch.setattr(sys, "argv", argv)
        vllm_state._frontend_config.cache_clear()
        try:
            vllm_state.RetrofitBatchMirror.validate_params(SimpleNamespace(extra_args=args))
        finally:
            vllm_state._frontend_config.cache_clear()

    with pytest.raises(ServeConfigError, match="did you mean 'retrofit'"):
        check(["script.py"], {"retrofitt": "arc"})
    with pytest.raises(ServeConfigError, match="without a retrofit serve config"):
        check([server, "--model", "m"], {"retrofit": "arc"})
    static = json.dumps({"architectures": ["RetrofitLlamaForCausalLM"], "retrofit": {"plan": "es"}})
    with pytest.raises(ServeConfigError, match="one static plan for every request"):
        check([server, "--hf-overrides", static], {"retrofit": "none"})
    check([server, "--hf-overrides", static], {"temperature_boost": 1})  # other keys: nothing to say
    check(["script.py"], {"retrofit": "anything"})  # offline LLM: the worker checks it


def test_serve_cli_refuses_conflicting_options(tmp_path):
    _, folder = _model_folder(tmp_path)
    for extra, what in ((["--artifact", f"a={tmp_path}"], "--artifact"), (["--request-plans"], "--request-plans"),
                        (["--default", "a"], "--default a")):
        res = _serve(["--model", str(folder), "--plan", "eses", *extra])
        assert res.exit_code == 2 and f"excludes {what}" in res.output and "Traceback" not in res.raw, res.raw
    res = _serve(["--model", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "not a model folder" in res.output, res.raw


def test_serve_cli_checks_everything_before_vllm_starts(tmp_path):
    """Plan length and repeat, NaN tensors, a missing tensor file, another model's artifact, a non-drllm
    artifact: each a one-line error (exit 2) from `retrofit serve --dry-run`, before vLLM would start."""
    model, folder = _model_folder(tmp_path)
    h = retrofit.attach(model, "drllm", bottleneck=8)
    h.init_routers(seed=0)
    h.save(tmp_path / "routers")
    h.detach()
    h = retrofit.attach(model, "drllm", plan=["execute", "skip", "execute", "execute"])
    h.save(tmp_path / "static")
    h.detach()
    ok = _serve(["--model", str(folder), "--artifact", f"r={tmp_path / 'routers'}", "--artifact",
                 f"p={tmp_path / 'static'}", "--request-plans"])
    assert ok.exit_code == 0, ok.raw
    assert "artifact p:" in ok.output and "3/4 layers executed" in ok.output and "routers" in ok.output
    assert f"--served-model-name {folder.name}" in ok.output and "'num_layers': 4" not in ok.output
    assert '"num_layers": 4' in ok.raw.replace("\\", "")

    nan = tmp_path / "nan"
    import shutil

    shutil.copytree(tmp_path / "routers", nan)
    t = load_file(str(nan / TENSORS_NAME))
    k = sorted(t)[0]
    t[k][0] = float("nan")
    save_file(t, str(nan / TENSORS_NAME))
    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "routers", missing)
    (missing / TENSORS_NAME).unlink()
    other, _ = _model_folder(tmp_path, seed=1)
    h = retrofit.attach(other, "drllm", bottleneck=8)
    h.init_routers(seed=0)
    h.save(tmp_path / "other")
    h.detach()
    for args, msg in [(["--plan", "eee"], "3 entries but the model has 4 decoder layers"),
                      (["--plan", "eree"], "'repeat'"),
                      (["--plan", "exq"], "letters"),
                      (["--artifact", f"n={nan}"], "holds NaN or inf"),
                      (["--artifact", f"m={missing}"], "is missing; the artifact is incomplete"),
                      (["--artifact", f"o={tmp_path / 'other'}"], "made for another base model"),
                      (["--artifact", f"x={tmp_path / 'nowhere'}"], "is not a retrofit artifact"),
                      (["--artifact", "nofolder"], "use NAME=FOLDER")]:
        res = _serve(["--model", str(folder), *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.raw, (args, res.raw)


def test_serve_cli_refuses_a_reroute_artifact(tmp_path):
    model, folder = _model_folder(tmp_path, "olmoe")
    h = retrofit.attach(model, "reroute", steps=1)
    h.save(tmp_path / "reroute")
    h.detach()
    res = _serve(["--model", str(folder), "--artifact", f"x={tmp_path / 'reroute'}"])
    assert res.exit_code == 2 and "is a 'reroute' artifact" in res.output and "Traceback" not in res.raw, res.raw


def test_served_model_checks_the_configs_layer_count(tmp_path):
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from retrofit.serve.config import ServeConfigError
    from retrofit.serve.vllm_model import RetrofitController

    vcfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(
        retrofit={"plan": "eses", "num_layers": 4})), compilation_config=SimpleNamespace(mode=0),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=False))
    with pytest.raises(ServeConfigError, match="num_layers=4 but the model has 6"):
        RetrofitController(vcfg, 6, 16)
    assert RetrofitController(vcfg, 4, 16).static_skip == [False, True, False, True]


def test_serve_cli_refuses_an_architecture_the_plugin_does_not_serve(tmp_path):
    _, folder = _model_folder(tmp_path, "olmoe")
    res = _serve(["--model", str(folder), "--plan", "e" * 4])
    assert res.exit_code == 2 and "not OlmoeForCausalLM" in res.output and "Traceback" not in res.raw, res.raw


# ---------------------------------------------------------------------------------------------- command line


def _gpt2_folder(tmp_path):
    """A model folder of a family retrofit does not support (GPT-2), with a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(folder)
    return folder


def test_cli_model_mistakes_are_one_line_errors(tmp_path, shared_data):
    (tmp_path / "empty").mkdir()
    cases = [(str(tmp_path / "nowhere"), "not found: give 'default' or a local folder"),
             (str(tmp_path / "empty"), "has no config.json"),
             (str(_gpt2_folder(tmp_path)), "Supported families")]
    for model, msg in cases:
        for cmd in (["search", "--task", "arc_easy", "--limit", "1", "--out", str(tmp_path / "s.jsonl")],
                    ["eval", "--tasks", "arc_easy", "--method", "drllm", "--limit", "1", "--out", str(tmp_path / "e"),
                     "--no-plot", "--data", str(shared_data)]):
            res = _cli([*cmd, "--model", model], env={"RETROFIT_DATA": str(shared_data)})
            assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.raw, (cmd, model, res.raw)
    res = _cli(["search", "--task", "arc_easy", "--budget", "abc", "--out", str(tmp_path / "s.jsonl")])
    assert res.exit_code == 2 and "budget 'abc'" in res.output, res.raw


def test_every_command_turns_user_errors_into_one_line():
    from retrofit.cli import app

    def commands(a):
        for c in a.registered_commands:
            yield c
        for g in a.registered_groups:
            yield from commands(g.typer_instance)

    unwrapped = [c.name or c.callback.__name__ for c in commands(app)
                 if not getattr(c.callback, "_retrofit_wrapped", False)]
    assert not unwrapped


# ---------------------------------------------------------------------------------------------- search files


def _toy_search(tmp_path, name, **kw):
    from retrofit.search.mcts import MCTSConfig
    from retrofit.search.run import search_examples
    from retrofit.testing.search_toys import CharTokenizer, toy_examples

    m = tiny_model("llama", seed=0, initializer_range=0.5)
    tok = CharTokenizer(m.config.vocab_size)
    return search_examples(m, tok, toy_examples(4), tmp_path / name, cfg=MCTSConfig(simulations=6), seed=0,
                           progress=False, **kw)


def test_two_searches_on_one_out_file_are_refused(tmp_path):
    from retrofit.search.run import SearchLockedError, output_lock

    out = tmp_path / "s.jsonl"
    with output_lock(out):  # another search holds the file
        with pytest.raises(SearchLockedError, match=r"another `retrofit search` \(pid \d+\) is writing"):
            _toy_search(tmp_path, "s.jsonl")
    assert not out.exists() or out.read_text() == ""  # nothing written twice
    assert len(_toy_search(tmp_path, "s.jsonl")) == 4  # the lock is gone with its holder
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("damage", ["middle", "torn_with_newline", "not_an_object"])
def test_damaged_search_lines_are_named_and_repair_loses_nothing_computed(tmp_path, damage):
    from retrofit.core.data import SearchFileError, read_search_records

    clean = _toy_search(tmp_path, "clean.jsonl")
    out = tmp_path / "s.jsonl"
    lines = (tmp_path / "clean.jsonl").read_text().splitlines(keepends=True)
    if damage == "middle":
        lines[1] = lines[1][: len(lines[1]) // 2] + "}\n"
    elif damage == "torn_with_newline":
        lines[3] = lines[3][:40] + "\n"
    else:
        lines[2] = "[1, 2]\n"
    bad_line = {"middle": 2, "torn_with_newline": 4, "not_an_object": 3}[damage]
    out.write_text("".join(lines))
    with pytest.raises(SearchFileError, match=rf"s.jsonl:{bad_line}: .*--repair"):
        read_search_records(out)
    with pytest.raises(SearchFileError, match=rf"s.jsonl:{bad_line}:"):
        _toy_search(tmp_path, "s.jsonl")
    kept = [ln for i, ln in enumerate(lines, 1) if i != bad_line]
    assert out.read_text() == "".join(lines)  # refused: nothing touched
    res = _cli(["train", "--searches", str(out), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and f"s.jsonl:{bad_line}:" in res.output and "Traceback" not in res.raw, res.raw
    recs = _toy_search(tmp_path, "s.jsonl", repair=True)
    assert (tmp_path / "s.jsonl.dropped").read_text() == lines[bad_line - 1]
    assert out.read_text().startswith("".join(kept))  # every good record kept, in order; the dropped one redone
    assert [r["plan"] for r in recs] == [r["plan"] for r in clean]


def test_search_repair_command(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text('{"index": 0, "id": "a"}\n{"index": 1, "id"\n{"index": 2, "id": "c"}\n{"index": 3')
    res = _cli(["search-repair", str(out)])
    assert res.exit_code == 0 and "dropped lines [2, 4]" in res.output, res.raw
    assert out.read_text() == '{"index": 0, "id": "a"}\n{"index": 2, "id": "c"}\n'
    assert (tmp_path / "s.jsonl.dropped").read_text() == '{"index": 1, "id"\n{"index": 3\n'
    assert "nothing to repair" in _cli(["search-repair", str(out)]).output


# ---------------------------------------------------------------------------------------------- training


def test_killed_training_resumes_from_its_checkpoint_with_the_same_result(tmp_path):
    from test_drllm_train import _fake_search_file, _Tok

    from retrofit.methods.drllm.train import CHECKPOINT_NAME, CheckpointError, TrainConfig, train_from_searches

    _fake_search_file(tmp_path / "s.jsonl", 32, 4)
    cfg = TrainConfig(epochs=6, lr=1e-2, patience=6, warmup_steps=2)
    kw = dict(num_windows=4, bottleneck=16, progress=False)
    model = tiny_model("llama")
    full = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "full", cfg, **kw)
    assert not (tmp_path / "full" / CHECKPOINT_NAME).exists()  # removed once the artifact is saved
    part = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "r", cfg, stop_after=3, **kw)
    assert part["interrupted"] and len(part["history"]) == 3
    assert (tmp_path / "r" / CHECKPOINT_NAME).is_file() and not (tmp_path / "r" / TENSORS_NAME).exists()
    with pytest.raises(CheckpointError, match="another training run.*--no-resume"):
        train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "r",
                            dataclasses.replace(cfg, lr=2e-2), **kw)
    rest = train_from_searches(model, _Tok(), [tmp_path / "s.jsonl"], tmp_path / "r", cfg, **kw)
    assert rest["resumed_from_epoch"] == 3
    assert rest["history"] == full["history"] and rest["best_epoch"] == full["best_epoch"]
    a, b = load_file(str(tmp_path / "full" / TENSORS_NAME)), load_file(str(tmp_path / "r" / TENSORS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_serve_cli_names_the_unserved_architecture_first(tmp_path):
    res = _serve(["--model", str(_gpt2_folder(tmp_path)), "--plan", "ee"])
    assert res.exit_code == 2 and "not GPT2LMHeadModel" in res.output and "Traceback" not in res.raw, res.raw


def test_static_server_worker_ends_requests_with_retrofit_arguments():
    """Offline (the front end sees no config) a request to a one-plan engine that asks for an artifact or a plan
    is ended by the worker instead of being answered under the server's plan."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from retrofit.serve.vllm_model import RetrofitController
    from retrofit.serve.vllm_state import RowState

    vcfg = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(retrofit={"plan": "eses"})),
                           compilation_config=SimpleNamespace(mode=3),
                           cache_config=SimpleNamespace(enable_prefix_caching=True),
                           scheduler_config=SimpleNamespace(enable_chunked_prefill=True))
    ctl = RetrofitController(vcfg, 4, 16)
    rows = [RowState({}, 3), None, RowState({"retrofit": "arc"}, 3), RowState({"retrofit_plan": "eeee"}, 3),
            RowState({"retrofitt": "x"}, 3)]
    ctl.check_static_rows(rows)
    assert rows[0].error is None and rows[0].choice.kind == "default"
    assert all("one static plan" in r.error for r in rows[2:4]) and "did you mean" in rows[4].error
