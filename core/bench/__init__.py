"""The serving benchmark: workloads, metrics and runners behind `fastgen bench serve`."""
