"""puzzle_visualizer.html in headless Chromium: the cells it shows are the .npy data, navigation lands where asked.

Datasets are written with plain numpy into a served temp folder next to a copy of the page; expectations
(bounding boxes, colours, digits, wrong cells) are recomputed here from the arrays, not read from the page's code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.browser import synthetic
from tests.browser.chromium import http_server, start_driver
from tests.helpers import REPO

PAGE = REPO / "puzzle_visualizer.html"
ARC_RGB = [
    "rgb(0, 0, 0)",
    "rgb(0, 116, 217)",
    "rgb(255, 65, 54)",
    "rgb(46, 204, 64)",
    "rgb(255, 220, 0)",
    "rgb(170, 170, 170)",
    "rgb(240, 18, 190)",
    "rgb(255, 133, 27)",
    "rgb(127, 219, 255)",
    "rgb(135, 12, 37)",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Served folder with the page and one dataset of each kind (deliberately mixed dtypes)."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(PAGE, root / PAGE.name)
    data = {
        "arc": synthetic.write_arc_dataset(
            root / "arc", seed=1, dtypes={"labels": np.int64, "puzzle_indices": np.int64}
        ),
        "sudoku": synthetic.write_sudoku_dataset(root / "sudoku", seed=2, dtypes={"inputs": np.int32}),
        "maze": synthetic.write_maze_dataset(root / "maze", seed=3),
    }
    with http_server(root) as url:
        yield root, url, data


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = start_driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield d
    finally:
        d.quit()


def render_count(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.render)"))


def wait_render(driver, before: int, timeout: float = 15.0) -> None:
    """Wait until the page has finished a render after `before`; fail with the page's message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body.dataset.state")
        if state == "error":
            pytest.fail("page error: " + driver.find_element("id", "message").text)
        if render_count(driver) > before and state == "ready":
            return
        time.sleep(0.05)
    pytest.fail("page did not render; message: " + driver.find_element("id", "message").text)


def open_page(driver, url: str, query: str) -> None:
    driver.get(f"{url}puzzle_visualizer.html?{query}")
    wait_render(driver, 0)


def click(driver, element_id: str) -> None:
    before = render_count(driver)
    driver.find_element("id", element_id).click()
    wait_render(driver, before)


def jump(driver, kind: str, text: str) -> None:
    box = driver.find_element("id", f"jump-{kind}-input")
    box.clear()
    box.send_keys(text)
    click(driver, f"jump-{kind}")


def position(driver) -> dict:
    return driver.execute_script("return Object.assign({}, document.getElementById('position').dataset)")


def cells(driver, example: int, panel: str) -> list[dict]:
    return driver.execute_script(
        """
        const sel = `.panel[data-panel="${arguments[1]}"][data-example="${arguments[0]}"] .cell`;
        return Array.from(document.querySelectorAll(sel)).map((c) => ({
          row: Number(c.dataset.row), col: Number(c.dataset.col), value: Number(c.dataset.value),
          text: c.textContent, bg: getComputedStyle(c).backgroundColor, wrong: c.classList.contains("wrong")}));
        """,
        example,
        panel,
    )


def shown_examples(driver) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.example')).map((e) => Number(e.dataset.example))"
    )


def bbox_cells(rows: list[np.ndarray], width: int) -> set[tuple[int, int]]:
    """All cells of the bounding box of non-PAD tokens (independent of the page's code)."""
    grids = [np.asarray(r).reshape(-1, width) for r in rows]
    rs, cs = np.nonzero(np.any([g != 0 for g in grids], axis=0))
    return {(r, c) for r in range(rs.min(), rs.max() + 1) for c in range(cs.min(), cs.max() + 1)}


def check_arc_puzzle(driver, arrays: dict, puzzle: int) -> None:
    """Every example of the puzzle is shown; input and label cells equal the arrays, coloured in ARC colours."""
    start, end = arrays["puzzle_indices"][puzzle], arrays["puzzle_indices"][puzzle + 1]
    assert shown_examples(driver) == list(range(start, end))
    for e in range(start, end):
        for panel, key in (("input", "inputs"), ("label", "labels")):
            row = np.asarray(arrays[key][e])
            shown = cells(driver, e, panel)
            assert {(c["row"], c["col"]) for c in shown} == bbox_cells([row], 30)
            for c in shown:
                token = int(row[c["row"] * 30 + c["col"]])
                assert c["value"] == token
                if token >= 2:
                    assert c["bg"] == ARC_RGB[token - 2]


def test_arc_navigation_matches_npy(driver, site, tmp_path):
    _, url, data = site
    train, test, names = data["arc"]["train"], data["arc"]["test"], data["arc"]["names"]
    open_page(driver, url, "base=arc/")
    assert position(driver)["split"] == "train" and position(driver)["puzzle"] == "0"
    check_arc_puzzle(driver, train, 0)

    click(driver, "next-puzzle")
    click(driver, "next-puzzle")
    assert position(driver)["puzzle"] == "2" and position(driver)["group"] == "1"  # 2 puzzles per group
    check_arc_puzzle(driver, train, 2)
    click(driver, "prev-puzzle")
    assert (position(driver)["puzzle"], position(driver)["group"]) == ("1", "0")
    check_arc_puzzle(driver, train, 1)

    click(driver, "next-group")  # from group 0 to the first puzzle of group 1
    assert (position(driver)["puzzle"], position(driver)["group"]) == ("2", "1")
    click(driver, "next-group")
    assert (position(driver)["puzzle"], position(driver)["group"]) == ("4", "2")
    check_arc_puzzle(driver, train, 4)
    click(driver, "prev-group")
    assert (position(driver)["puzzle"], position(driver)["group"]) == ("2", "1")

    jump(driver, "puzzle", "5")
    assert position(driver)["puzzle"] == "5"
    assert position(driver)["name"] == names[int(train["puzzle_identifiers"][5])]
    check_arc_puzzle(driver, train, 5)
    jump(driver, "group", "0")
    assert position(driver)["puzzle"] == "0"

    # a name from identifiers.json that lives in the test split: the page switches split
    target = 3
    name = names[int(test["puzzle_identifiers"][target])]
    jump(driver, "puzzle", name)
    assert (position(driver)["split"], position(driver)["puzzle"], position(driver)["name"]) == ("test", "3", name)
    check_arc_puzzle(driver, test, target)

    # a prefix of a name finds the first puzzle whose name starts with it (here a train variant)
    variant = names[int(train["puzzle_identifiers"][3])]
    assert "_t" in variant
    jump(driver, "puzzle", variant[: variant.index("_t") + 3])
    assert (position(driver)["split"], position(driver)["puzzle"]) == ("train", "3")

    box = driver.find_element("id", "jump-puzzle-input")
    box.clear()
    box.send_keys("no-such-puzzle")
    driver.find_element("id", "jump-puzzle").click()
    deadline = time.monotonic() + 10
    while "no puzzle named" not in driver.find_element("id", "message").text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "no puzzle named 'no-such-puzzle'" in driver.find_element("id", "message").text
    assert position(driver)["puzzle"] == "3"  # unchanged

    shot = tmp_path / "arc.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sudoku_predictions_marked(driver, site, tmp_path):
    root, url, data = site
    from tools.visualize import export_predictions

    test = data["sudoku"]["test"]
    rng = np.random.default_rng(5)
    preds = synthetic.corrupt(rng, test["labels"], rows=[1, 3], vocab_size=11, cells=4)
    q_halt = np.linspace(-2, 2, len(preds))
    files = synthetic.write_saved_predictions(
        tmp_path / "ckpt", 7, test, preds, q_halt, vocab_size=11, world_size=2, global_batch=4
    )
    export_predictions(files[0], root / "sudoku", root / "sudoku_preds")

    open_page(driver, url, "base=sudoku/&preds=sudoku_preds/")
    assert position(driver)["split"] == "test"  # the split the predictions belong to
    for p in range(len(preds)):
        if p:
            click(driver, "next-puzzle")
        assert position(driver)["puzzle"] == str(p)
        for panel, expected in (("input", test["inputs"][p]), ("label", test["labels"][p]), ("prediction", preds[p])):
            shown = cells(driver, p, panel)
            assert len(shown) == 81
            for c in shown:
                token = int(expected[c["row"] * 9 + c["col"]])
                assert c["value"] == token
                assert c["text"] == ("" if token <= 1 else str(token - 1))  # digit d is token d+1; blank, PAD empty
        shown = cells(driver, p, "prediction")
        wrong = {(c["row"], c["col"]) for c in shown if c["wrong"]}
        assert wrong == {(i // 9, i % 9) for i in np.flatnonzero(preds[p] != test["labels"][p])}
        assert len(wrong) == (4 if p in (1, 3) else 0)
    shot = tmp_path / "sudoku.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_maze_cells(driver, site):
    _, url, data = site
    train = data["maze"]["train"]
    side = 7
    look = {
        1: "rgb(51, 52, 61)",
        2: "rgb(255, 255, 255)",
        3: "rgb(46, 204, 64)",
        4: "rgb(224, 49, 43)",
        5: "rgb(255, 210, 77)",
    }
    open_page(driver, url, "base=maze/&split=train&puzzle=2")
    assert position(driver)["puzzle"] == "2"
    for p in (2, 3):
        if p == 3:
            click(driver, "next-puzzle")
        for panel, key in (("input", "inputs"), ("label", "labels")):
            shown = cells(driver, p, panel)
            assert len(shown) == side * side
            for c in shown:
                token = int(train[key][p][c["row"] * side + c["col"]])
                assert c["value"] == token and c["bg"] == look[token]
                assert c["text"] == {3: "S", 4: "G", 5: "\u2022"}.get(token, "")


def test_npy_parser_dtypes_versions_orders(driver, site):
    root, url, _ = site
    rng = np.random.default_rng(0)
    cases = {}
    for descr in ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f4", "<f8", "|b1", ">i4", ">f8"):
        lo, hi = (0, 2) if descr == "|b1" else (0 if "u" in descr else -100, 120)
        cases[descr.replace("<", "le_").replace(">", "be_").replace("|", "")] = (
            rng.integers(lo, hi, size=(3, 5)).astype(descr),
            (1, 0),
        )
    cases["fortran"] = (np.asfortranarray(rng.integers(0, 9, size=(4, 3)).astype(np.int32)), (1, 0))
    cases["v2"] = (rng.integers(0, 9, size=(2, 6)).astype(np.int64), (2, 0))
    cases["v3"] = (rng.integers(0, 9, size=(7,)).astype(np.uint8), (3, 0))
    cases["empty"] = (np.zeros((0, 4), dtype=np.int32), (1, 0))
    (root / "npy").mkdir(exist_ok=True)
    for name, (arr, version) in cases.items():
        with open(root / "npy" / f"{name}.npy", "wb") as f:
            np.lib.format.write_array(f, arr, version=version)
    open_page(driver, url, "base=arc/")
    for name, (arr, _) in cases.items():
        got = driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            fetch(arguments[0]).then((r) => r.arrayBuffer()).then((b) => done(HRMViz.parseNpy(b, arguments[0])))
              .catch((e) => done({error: e.message}));
            """,
            f"npy/{name}.npy",
        )
        assert "error" not in got, (name, got)
        assert got["shape"] == list(arr.shape), name
        assert np.array_equal(np.array(got["data"], dtype=np.float64), arr.astype(np.float64).reshape(-1)), name


def test_folder_picker_and_bad_metadata(driver, site, tmp_path):
    root, url, data = site
    driver.get(f"{url}puzzle_visualizer.html")
    before = render_count(driver)
    driver.find_element("id", "dataset-picker").send_keys(str(root / "sudoku"))
    wait_render(driver, before)
    train = data["sudoku"]["train"]
    shown = cells(driver, 0, "input")
    assert [c["value"] for c in shown] == [int(v) for v in train["inputs"][0]]

    bad = root / "bad"
    shutil.copytree(root / "maze", bad)
    (bad / "test" / "dataset.json").write_text("{not json")
    driver.get(f"{url}puzzle_visualizer.html?base=bad/")
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.body.dataset.state") != "error" and time.monotonic() < deadline:
        time.sleep(0.05)
    message = driver.find_element("id", "message").text
    assert "test/dataset.json" in message and "malformed JSON" in message
    json.loads((root / "maze" / "test" / "dataset.json").read_text())  # the original stays intact


def test_builder_output_maze(driver, site, tmp_path):
    """A dataset made by the project's own maze builder (with --aug: groups of 8 dihedral variants)."""
    root, url, _ = site
    rng = np.random.default_rng(7)
    side = 5
    src = tmp_path / "src"
    src.mkdir()
    mazes = {}
    for split, n in (("train", 2), ("test", 2)):
        rows = ["source,q,a,rating"]
        mazes[split] = []
        for i in range(n):
            a = rng.choice(list("# o"), size=side * side)
            a[0], a[-1] = "S", "G"
            q = np.where(a == "o", " ", a)
            mazes[split].append(("".join(q), "".join(a)))
            rows.append(f"gen,{''.join(q)},{''.join(a)},{i}")
        (src / f"{split}.csv").write_text("\n".join(rows) + "\n")
    out = root / "built_maze"
    res = subprocess.run(
        [sys.executable, "dataset/build_maze_dataset.py", "--source-repo", str(src), "--output-dir", str(out), "--aug"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    look = {
        "#": "rgb(51, 52, 61)",
        " ": "rgb(255, 255, 255)",
        "S": "rgb(46, 204, 64)",
        "G": "rgb(224, 49, 43)",
        "o": "rgb(255, 210, 77)",
    }
    arrays = {k: np.load(out / "train" / f"all__{k}.npy") for k in ("inputs", "labels", "group_indices")}
    open_page(driver, url, "base=built_maze/&split=train")
    click(driver, "next-group")
    first = int(arrays["group_indices"][1])
    assert position(driver)["puzzle"] == str(first)  # the identity variant of the second maze
    q, a = mazes["train"][1]
    for panel, key, text in (("input", "inputs", q), ("label", "labels", a)):
        shown = cells(driver, first, panel)
        assert len(shown) == side * side
        for c in shown:
            i = c["row"] * side + c["col"]
            assert c["value"] == int(arrays[key][first][i])
            assert c["bg"] == look[text[i]]  # the CSV character, through builder and viewer
    jump(driver, "puzzle", "0")
    click(driver, "next-puzzle")  # a dihedral variant: its cells are the .npy row, whatever the transform
    shown = cells(driver, 1, "input")
    assert [c["value"] for c in shown] == [int(v) for v in arrays["inputs"][1]]
