"""Cloud TPU API access (google.cloud.tpu_v2 over REST): client, calls, stale-process clean-up."""
