"""What the service tells operators: JSON logs, Prometheus metrics and OpenTelemetry traces."""
