# Sourced by the run_*_methods.sh scripts: the FP32 and FP16 exports of one preset, and the machine line.
# export_pair PRESET LAYERS INIT WORK_DIR  -> WORK_DIR/fp32.onnx, WORK_DIR/fp16.onnx (seed 0)
export_pair() {
  hn-export export --preset "$1" --layers "$2" --seed 0 --init "$3" -o "$4/fp32.onnx"
  hn-export export --preset "$1" --layers "$2" --seed 0 --init "$3" --fp16 -o "$4/fp16.onnx"
}
# record_run TIME_LOG OUT_DIR  -> OUT_DIR/time.txt (wall time, peak RSS of /usr/bin/time -v) and OUT_DIR/machine.txt
record_run() {
  grep -E "Elapsed|Maximum resident" "$1" > "$2/time.txt"
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print(machine())" > "$2/machine.txt"
}
