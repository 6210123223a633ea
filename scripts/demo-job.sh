# The job ./demo runs under hep-exec on the "worker node": everything below comes from /cvmfs.
set -e
cd /cvmfs/demo.example.org
echo "   shell script: $(bin/hello.sh)"
if [ -x bin/hello ]; then echo "   compiled binary: $(bin/hello)"; fi
PYTHONPATH=/cvmfs/demo.example.org/lib/python python3 -c '
import hepdemo, hepdemo.physics as p
m = p.invariant_mass(45.6, 45.6, 3.14159)
print("   python import:", hepdemo.greet("the demo"), f"| m = {m:.1f} GeV")'
echo "   variant symlink: etc/setup-variant.sh -> $(readlink etc/setup-variant.sh)"
echo "   files: $(find . -type f | wc -l), directories: $(find . -type d | wc -l)"
touch /cvmfs/demo.example.org/x 2>/dev/null || echo "   writing to /cvmfs: refused (read-only file system)"
