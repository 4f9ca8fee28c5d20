"""What a study costs: calibrate a device, predict each run's time and memory, record what runs consumed.

* `deconver calibrate` (calibrate.py): per-(dataset, model) step timings and memory on a device.
* `deconver plan` (cli.py): per-run predictions and device-hour totals (estimate.py).
* `record_attempt` (record.py): each training attempt's wall time and peak memory in the run's cost.json.
"""
