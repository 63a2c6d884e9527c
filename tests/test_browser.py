"""The upload page in a real headless Chromium (Debian's ``chromium`` package, driven by
Playwright without any downloaded browser): pick a real 600x450 sample, see the
probabilities and the Grad-CAM overlay. A screenshot is kept in ``tests/artifacts/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from skin_lesion_classifier.api.server import LocalServer
from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, meta = tiny_model(
        [48, 64],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        decision={"melanoma_threshold": 0.1},
    )
    folder = tmp_path_factory.mktemp("browser")
    ckpt = save_checkpoint(folder / "model.pt", model, meta)
    with LocalServer(
        {"SLC_MODEL": str(ckpt), "SLC_THREADS": "1"}, log_path=folder / "serve.log"
    ) as s:
        yield s


def test_upload_page_shows_probabilities_and_overlay(
    server, samples_dir: Path, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright"
    )
    sample = sorted((samples_dir / "images").glob("*.jpg"))[0]
    ARTIFACTS.mkdir(exist_ok=True)
    console_errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda m: console_errors.append(m.text) if m.type == "error" else None,
            )
            page.goto(server.url + "/")
            page.wait_for_function(
                "document.getElementById('model-info').textContent.includes('test_efficientnet')"
            )
            page.set_input_files("#file-input", str(sample))
            # the optional patient fields: this model is image-only, and says so
            assert "image-only" in page.locator("#metadata-hint").inner_text()
            page.fill("#age-input", "45")
            page.select_option("#sex-input", "female")
            page.click("#submit-button")
            page.wait_for_selector("#status:text('Done.')", timeout=60_000)
            assert "(age, sex ignored)" in page.locator("#metadata-note").inner_text()

            rows = page.locator("#probabilities tbody tr")
            assert rows.count() == 7
            shown = {rows.nth(i).get_attribute("data-class") for i in range(7)}
            assert shown == set(CLASSES)
            values = [
                float(rows.nth(i).locator("td.p").inner_text().rstrip(" %"))
                for i in range(7)
            ]
            assert values == sorted(values, reverse=True)  # sorted, most likely first
            assert abs(sum(values) - 100) < 0.5
            assert page.locator("#top-class").inner_text().split(" ")[0] in CLASSES
            assert "Melanoma flag" in page.locator("#melanoma").inner_text()
            # the Grad-CAM overlay really rendered
            width = page.eval_on_selector(
                "#overlay", "img => img.complete ? img.naturalWidth : 0"
            )
            assert width >= 384
            assert "Grad-CAM for" in page.locator("#overlay-caption").inner_text()
            page.screenshot(path=str(ARTIFACTS / "upload_page.png"), full_page=True)

            # a broken file shows the service's error instead of a result
            bad = tmp_path / "broken.jpg"
            bad.write_bytes(sample.read_bytes()[:2000])
            page.set_input_files("#file-input", str(bad))
            page.click("#submit-button")
            page.wait_for_selector("#status.error", timeout=30_000)
            assert "422 invalid_image" in page.locator("#status").inner_text()
            assert page.locator("#result").is_hidden()
            page.screenshot(
                path=str(ARTIFACTS / "upload_page_error.png"), full_page=True
            )
        finally:
            browser.close()
    assert (ARTIFACTS / "upload_page.png").stat().st_size > 10_000
    # the only console errors allowed are the failed 422 request of the broken upload
    assert all("422" in e for e in console_errors), console_errors
