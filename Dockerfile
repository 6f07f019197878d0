# The image the cloud-weekly deployment (prefect.yaml) runs in: the project installed, and git for
# its pull steps, which clone into the working directory (the unprivileged user's home).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/imgclf
COPY . .
RUN pip install --no-cache-dir . && useradd --create-home imgclf
USER imgclf
WORKDIR /home/imgclf
CMD ["imgclf", "--help"]
