#!/usr/bin/env python3
"""Helpers around a running moto server, for shiftd's tests and demo.

  fakeaws.py seed   --endpoint URL --account ID --region R --count N [--tag K=V ...] [--state stopped]
      Creates N instances in account ID (through AssumeRole into arn:aws:iam::ID:role/seed, as moto
      maps assumed-role credentials to that account; moto's default account 123456789012 is used
      directly). Prints their IDs as a JSON array.
  fakeaws.py states --endpoint URL --account ID --region R
      Prints {instance id: state} of every instance of the account and region as JSON.
  fakeaws.py calls  --endpoint URL
      Prints the recorded API calls (moto's request recorder) as a JSON array of
      {"action": ..., "role_arn": ..., "instance_ids": [...]}, in order.
  fakeaws.py record --endpoint URL   (start recording; `calls` reads what was recorded since)
  fakeaws.py sns-topic --endpoint URL --name NAME [--region R]
      Creates an SNS topic in the default account 123456789012 and an SQS queue subscribed to it.
      Prints {"topic_arn": ..., "queue_url": ...}.
  fakeaws.py sqs-messages --endpoint URL --queue-url URL [--region R]
      Prints the bodies of the messages waiting in the queue (SNS envelopes) as a JSON array.
  fakeaws.py org --endpoint URL --account ID OP [ARG ...]
      AWS Organizations, as its management account ID (moto keeps one organization per account, and
      maps assumed-role credentials to the role's account). OP is one of:
        create                     creates the organization; prints {"root": ROOT ID}
        ou PARENT NAME             creates an OU under PARENT; prints its ID
        account PARENT NAME        creates an account and moves it under PARENT; prints its ID
        close ID                   closes the account (moto then lists it SUSPENDED)
"""

import argparse
import base64
import json
import sys
import urllib.request
from urllib.parse import parse_qs

import boto3

BASE_ACCOUNT = "123456789012"
SEED_KEY = dict(aws_access_key_id="AKIAFAKESEED0000000", aws_secret_access_key="seed")


def ec2_for(endpoint, account, region):
    kw = dict(SEED_KEY)
    if account != BASE_ACCOUNT:
        sts = boto3.client("sts", endpoint_url=endpoint, region_name=region, **SEED_KEY)
        c = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/seed", RoleSessionName="fakeaws-seed")[
            "Credentials"
        ]
        kw = dict(
            aws_access_key_id=c["AccessKeyId"],
            aws_secret_access_key=c["SecretAccessKey"],
            aws_session_token=c["SessionToken"],
        )
    return boto3.client("ec2", endpoint_url=endpoint, region_name=region, **kw)


def seed(args):
    ec2 = ec2_for(args.endpoint, args.account, args.region)
    tags = [dict(zip(("Key", "Value"), t.split("=", 1))) for t in args.tag]
    spec = {}
    if tags:
        spec["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
    r = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=args.count, MaxCount=args.count, **spec)
    ids = [i["InstanceId"] for i in r["Instances"]]
    if args.state == "stopped":
        ec2.stop_instances(InstanceIds=ids)
        ec2.describe_instances(InstanceIds=ids)  # moto completes the transition on the next describe
    print(json.dumps(ids))


def states(args):
    ec2 = ec2_for(args.endpoint, args.account, args.region)
    out = {}
    for page in ec2.get_paginator("describe_instances").paginate():
        for res in page["Reservations"]:
            for i in res["Instances"]:
                out[i["InstanceId"]] = i["State"]["Name"]
    print(json.dumps(out))


def record(args):
    for path in ("/moto-api/recorder/reset-recording", "/moto-api/recorder/start-recording"):
        urllib.request.urlopen(urllib.request.Request(args.endpoint + path, method="POST")).read()


def calls(args):
    raw = urllib.request.urlopen(args.endpoint + "/moto-api/recorder/download-recording").read().decode()
    out = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        body = entry.get("body") or ""
        try:
            body = base64.b64decode(body).decode()
        except Exception:
            pass
        q = {k: v for k, v in parse_qs(body).items()}
        q.update({k: v for k, v in parse_qs(entry.get("qs", "").lstrip("?")).items()})
        action = (q.get("Action") or [None])[0]
        if action is None:
            continue
        ids = [v[0] for k, v in sorted(q.items()) if k.startswith("InstanceId.")]
        out.append({"action": action, "role_arn": (q.get("RoleArn") or [None])[0], "instance_ids": ids,
                    "session_name": (q.get("RoleSessionName") or [None])[0]})
    print(json.dumps(out))


def sns_topic(args):
    kw = dict(endpoint_url=args.endpoint, region_name=args.region, **SEED_KEY)
    sns, sqs = boto3.client("sns", **kw), boto3.client("sqs", **kw)
    arn = sns.create_topic(Name=args.name)["TopicArn"]
    queue = sqs.create_queue(QueueName=args.name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
    print(json.dumps({"topic_arn": arn, "queue_url": queue}))


def sqs_messages(args):
    sqs = boto3.client("sqs", endpoint_url=args.endpoint, region_name=args.region, **SEED_KEY)
    r = sqs.receive_message(QueueUrl=args.queue_url, MaxNumberOfMessages=10)
    print(json.dumps([json.loads(m["Body"]) for m in r.get("Messages", [])]))


def org(args):
    sts = boto3.client("sts", endpoint_url=args.endpoint, region_name="us-east-1", **SEED_KEY)
    cr = sts.assume_role(RoleArn=f"arn:aws:iam::{args.account}:role/seed", RoleSessionName="fakeaws-seed")[
        "Credentials"
    ]
    o = boto3.client("organizations", endpoint_url=args.endpoint, region_name="us-east-1",
                     aws_access_key_id=cr["AccessKeyId"], aws_secret_access_key=cr["SecretAccessKey"],
                     aws_session_token=cr["SessionToken"])
    op, rest = args.op, args.args
    if op == "create":
        o.create_organization(FeatureSet="ALL")
        print(json.dumps({"root": o.list_roots()["Roots"][0]["Id"]}))
    elif op == "ou":
        print(json.dumps(o.create_organizational_unit(ParentId=rest[0], Name=rest[1])["OrganizationalUnit"]["Id"]))
    elif op == "account":
        parent, name = rest
        account = o.create_account(Email=f"{name}@example.invalid", AccountName=name)["CreateAccountStatus"]["AccountId"]
        root = o.list_roots()["Roots"][0]["Id"]
        if parent != root:
            o.move_account(AccountId=account, SourceParentId=root, DestinationParentId=parent)
        print(json.dumps(account))
    elif op == "close":
        o.close_account(AccountId=rest[0])
    else:
        sys.exit(f"unknown org operation {op}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("seed", "states", "calls", "record", "sns-topic", "sqs-messages"):
        s = sub.add_parser(name)
        s.add_argument("--endpoint", required=True)
        if name in ("seed", "states"):
            s.add_argument("--account", default=BASE_ACCOUNT)
            s.add_argument("--region", default="ap-northeast-1")
        if name in ("sns-topic", "sqs-messages"):
            s.add_argument("--region", default="ap-northeast-1")
            s.add_argument("--name" if name == "sns-topic" else "--queue-url", required=True)
        if name == "seed":
            s.add_argument("--count", type=int, default=1)
            s.add_argument("--tag", action="append", default=[])
            s.add_argument("--state", choices=("running", "stopped"), default="running")
    s = sub.add_parser("org")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--account", required=True)
    s.add_argument("op")
    s.add_argument("args", nargs="*")
    args = p.parse_args()
    {"org": org, "seed": seed, "states": states, "calls": calls, "record": record, "sns-topic": sns_topic,
     "sqs-messages": sqs_messages}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
