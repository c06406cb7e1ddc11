"""`import peftcore` must not import any framework or plugin."""

import subprocess
import sys


def test_import_peftcore_loads_no_framework() -> None:
    code = (
        "import sys, peftcore, peftcore.cli, peftcore.methods\n"
        "cfg = peftcore.LoraConfig(r=4, target_modules=['q'])\n"
        "heavy = [m for m in ('torch', 'singa', 'transformers', 'peftcore_torch', 'peftcore_singa') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import peftcore loaded: {out.stdout.strip()}"


def test_torch_plugin_module_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # makes `import torch` fail\n"
        "import peftcore_torch.plugin as p\n"
        "info = p.peftcore_backend().info()\n"
        "assert not info.available and 'torch' in info.reason, info\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
