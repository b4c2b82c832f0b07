"""Importing aqdetr_d2 without Detectron2 names the install script."""
import subprocess
import sys

BLOCK_DETECTRON2 = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "detectron2" or name.startswith("detectron2."):
            raise ImportError("No module named 'detectron2'")
sys.meta_path.insert(0, Block())
try:
    import aqdetr_d2
except ImportError as e:
    print(e)
    sys.exit(3)
"""


def test_missing_detectron2_names_the_install_script():
    proc = subprocess.run([sys.executable, "-c", BLOCK_DETECTRON2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "scripts/install.sh" in proc.stdout
