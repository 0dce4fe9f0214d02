"""benchmarks/few_shot.py keeps every finished cell: a killed run resumes, a run with other settings is refused."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "few_shot.py"


@pytest.fixture(scope="module")
def few_shot():
    spec = importlib.util.spec_from_file_location("few_shot_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_keeps_finished_cells_and_runs_only_the_new_ones(few_shot, tmp_path, monkeypatch):
    out = tmp_path / "few_shot.json"
    args = ["--tiny", "--sizes", "0,10", "--seeds", "0", "--steps", "2", "--out", str(out)]
    first = few_shot.main(args + ["--rows", "zero-shot,icl"])
    saved = json.loads(out.read_text())
    assert [(c["row"], c["size"]) for c in saved["cells"]] == [("zero-shot", 0), ("icl", 10)]

    ran = []
    real_cell = few_shot.cell
    monkeypatch.setattr(few_shot, "cell", lambda row, *a: ran.append(row) or real_cell(row, *a))
    second = few_shot.main(args + ["--rows", "zero-shot,icl,head-lora"])
    assert ran == ["head-lora"]  # the two finished cells came from the file
    assert second["cells"][:2] == first["cells"]
    assert [c["row"] for c in json.loads(out.read_text())["cells"]] == ["zero-shot", "icl", "head-lora"]


def test_a_rerun_with_other_cell_settings_is_refused(few_shot, tmp_path):
    out = tmp_path / "few_shot.json"
    few_shot.main(["--tiny", "--rows", "zero-shot", "--sizes", "0", "--seeds", "0", "--out", str(out)])
    with pytest.raises(SystemExit, match="other settings or seeds"):
        few_shot.main(["--tiny", "--rows", "zero-shot", "--sizes", "0", "--seeds", "0", "--shots", "2",
                       "--out", str(out)])


def test_rows_run_apart_come_together_with_cells_from(few_shot, tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--tiny", "--sizes", "0,10", "--seeds", "0", "--steps", "2"]
    few_shot.main(common + ["--rows", "zero-shot", "--out", str(a)])
    few_shot.main(common + ["--rows", "icl", "--out", str(b)])
    monkeypatch.setattr(few_shot, "cell", lambda *a: pytest.fail("a finished cell ran again"))
    both = few_shot.main(common + ["--rows", "zero-shot,icl", "--out", str(a), "--cells-from", str(b)])
    assert [c["row"] for c in both["cells"]] == ["zero-shot", "icl"]
    assert [c["row"] for c in json.loads(a.read_text())["cells"]] == ["zero-shot", "icl"]
    with pytest.raises(SystemExit):
        few_shot.main(common + ["--out", str(a), "--cells-from", str(tmp_path / "none.json")])


def test_ipet_starts_from_pets_generation_0_and_says_so(few_shot, tmp_path):
    out = tmp_path / "pet.json"
    res = few_shot.main(["--tiny", "--rows", "pet,ipet", "--sizes", "10", "--seeds", "0", "--steps", "2",
                         "--final-steps", "2", "--unlabelled", "16", "--ipet-generations", "1", "--out", str(out)])
    ipet = res["cells"][1]
    assert ipet["row"] == "ipet" and ipet["after_pet_runs"] == 1 and "pet_seconds" not in res["runs"][1]
    done = json.loads((tmp_path / "pet.work" / "pet-n10-s0" / "results.json").read_text())
    assert done["generations"] == 1 and done["reused"] == ["weights", "gen0/p0", "gen0/p1"]
    assert "+ PET |" in few_shot.table(res)


def test_ipet_alone_leaves_out_its_own_share_of_pet_so_its_time_means_the_same(few_shot, tmp_path):
    res = few_shot.main(["--tiny", "--rows", "ipet", "--sizes", "10", "--seeds", "0", "--steps", "2",
                         "--final-steps", "2", "--unlabelled", "16", "--ipet-generations", "1",
                         "--out", str(tmp_path / "ipet.json")])
    run, cell = res["runs"][0], res["cells"][0]
    units = json.loads((tmp_path / "ipet.work" / "pet-n10-s0" / "results.json").read_text())["unit_seconds"]
    share = units["weights"] + units["gen0/p0"] + units["gen0/p1"]  # iPET distils after its last generation only
    assert not run["after_pet"] and run["pet_seconds"] == pytest.approx(share)
    assert cell["seconds_per_run"] == pytest.approx(run["seconds"] - share) and cell["after_pet_runs"] == 1
    assert "+ PET |" in few_shot.table(res)


def test_seeds_in_another_order_resume_the_same_table(few_shot, tmp_path, monkeypatch):
    out = tmp_path / "few_shot.json"
    few_shot.main(["--tiny", "--rows", "icl", "--sizes", "10", "--seeds", "0", "--out", str(out)])
    first = json.loads(out.read_text())["runs"]
    monkeypatch.setattr(few_shot, "cell", lambda *a: pytest.fail("a finished cell ran again"))
    with pytest.raises(SystemExit, match="other settings or seeds"):  # another set of seeds is another table
        few_shot.main(["--tiny", "--rows", "icl", "--sizes", "10", "--seeds", "0,1", "--out", str(out)])
    res = few_shot.main(["--tiny", "--rows", "icl", "--sizes", "10", "--seeds", "0", "--out", str(out)])
    assert res["runs"] == first


def test_a_killed_cell_resumes_at_its_next_seed(few_shot, tmp_path, monkeypatch):
    out = tmp_path / "few_shot.json"
    args = ["--tiny", "--rows", "icl", "--sizes", "10", "--seeds", "0,1", "--out", str(out)]
    real_cell = few_shot.cell

    def killed_at_seed_1(row, size, seed, *a):
        if seed == 1:
            raise KeyboardInterrupt
        return real_cell(row, size, seed, *a)

    monkeypatch.setattr(few_shot, "cell", killed_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        few_shot.main(args)
    saved = json.loads(out.read_text())
    assert saved["cells"] == [] and [(r["row"], r["seed"]) for r in saved["runs"]] == [("icl", 0)]
    assert saved["runs"][0]["cpu"]  # the kernels' instruction set, since AVX2 and AVX-512 round differently

    ran = []
    monkeypatch.setattr(few_shot, "cell",
                        lambda row, size, seed, *a: ran.append(seed) or real_cell(row, size, seed, *a))
    res = few_shot.main(args)
    assert ran == [1]  # seed 0 came from the file
    assert res["cells"][0]["accuracy"][0] == saved["runs"][0]["accuracy"] and len(res["cells"][0]["accuracy"]) == 2


def test_a_pet_run_resumed_from_its_units_counts_the_time_they_took(few_shot, tmp_path, monkeypatch):
    # the tiny model in the same folder in every call, so the second call's units match the first's
    real_mkdtemp, tiny_root = few_shot.tempfile.mkdtemp, tmp_path / "tiny"
    tiny_root.mkdir()
    monkeypatch.setattr(few_shot.tempfile, "mkdtemp", lambda *a, prefix=None, **k: str(tiny_root)
                        if prefix == "few_shot_tiny_" else real_mkdtemp(*a, prefix=prefix, **k))
    common = ["--tiny", "--rows", "pet", "--sizes", "10", "--seeds", "0", "--steps", "2", "--final-steps", "2",
              "--unlabelled", "16", "--work", str(tmp_path / "work")]
    few_shot.main(common + ["--out", str(tmp_path / "a.json")])
    few_shot.main(common + ["--out", str(tmp_path / "b.json")])  # the same units: every one reused
    res = json.loads((tmp_path / "work" / "pet-n10-s0" / "results.json").read_text())
    assert res["trained"] == [] and len(res["unit_seconds"]) == 4
    run = json.loads((tmp_path / "b.json").read_text())["runs"][0]
    assert not run.get("seconds_partial") and run["seconds"] >= sum(res["unit_seconds"].values())

    # units saved without their time (an older unipeft): the run's time is partial and the table says so
    for done in (tmp_path / "work").rglob("done.json"):
        rec = json.loads(done.read_text())
        rec.pop("seconds", None)
        done.write_text(json.dumps(rec))
    third = few_shot.main(common + ["--out", str(tmp_path / "c.json")])
    assert third["runs"][0]["seconds_partial"] and third["cells"][0]["seconds_per_run"] is None
    assert "| ? *" in few_shot.table(third) and "leaves out runs resumed" in few_shot.table(third)
