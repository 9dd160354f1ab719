"""Every generated script of every recipe passes `bash -n` and shellcheck."""
import shutil
import subprocess

import pytest

from tests.golden_refresh import golden_files, recipe_names


def test_shellcheck_is_installed():
    # `make install` apt-installs it; a missing linter must fail loudly, not skip
    assert shutil.which("shellcheck"), "shellcheck missing: run `make install`"


@pytest.mark.parametrize("name", recipe_names())
@pytest.mark.parametrize("script", ["launch.sh", "job.sbatch"])
def test_generated_shell_is_clean(name, script, tmp_path):
    files = golden_files(name)
    assert script in files
    path = tmp_path / script
    path.write_bytes(files[script])
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    text = files[script].decode()
    assert "set -euo pipefail" in text
