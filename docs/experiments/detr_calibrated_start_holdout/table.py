"""Writes table.md of this folder from its logs (the last `copypaste:` line of each)."""
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [("teacher", "teacher.log")] + [(f"calibrated start {name}", f"calibrated_{key}.log")
         for key, name in (("w4a4", "W4A4A4"), ("w3a3", "W3A3A3"), ("w2a2", "W2A2A2"))]
lines = ["| model | AP | AP50 | AP75 | below the teacher |", "|---|---|---|---|---|"]
teacher_ap = None
for name, log in ROWS:
    ap, ap50, ap75 = map(float, re.findall(r"copypaste: ([\d.]+),([\d.]+),([\d.]+),", open(os.path.join(HERE, log)).read())[-1])
    teacher_ap = ap if teacher_ap is None else teacher_ap
    lines.append(f"| {name} | {ap:.1f} | {ap50:.1f} | {ap75:.1f} | {teacher_ap - ap:.1f} |")
with open(os.path.join(HERE, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
