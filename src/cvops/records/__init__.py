"""The records every part writes (predictions, api_log, feedback, drift reports, labelling,
model state): tables and migrations in one place that neither the service nor the monitor owns."""
