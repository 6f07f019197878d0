# The image the cloud-weekly deployment (prefect.yaml) runs in: the project installed, nothing else.
FROM python:3.11-slim
WORKDIR /opt/imgclf
COPY . .
RUN pip install --no-cache-dir . && useradd --create-home imgclf
USER imgclf
CMD ["imgclf", "--help"]
