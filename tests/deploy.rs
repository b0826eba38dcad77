//! `deploy/`: the CloudFormation template creates what the README says, and
//! the workers.toml it installs checks out (against moto).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::harness::{AWS_ENV, Aws, Moto, repo_path};

fn template() -> Value {
    let out = std::process::Command::new("python3")
        .arg(repo_path("tests/fixtures/cfn_to_json.py"))
        .arg(repo_path("deploy/cloudformation/renderq-fleet.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_template_creates_what_the_readme_says() {
    let t = template();
    let resources = &t["Resources"];
    // The redrive policy sits one above renderq's budget.
    let redrive = &resources["JobQueue"]["Properties"]["RedrivePolicy"];
    assert_eq!(redrive["maxReceiveCount"]["Ref"], "RedriveMaxReceiveCount");
    let count = &t["Parameters"]["RedriveMaxReceiveCount"];
    assert!(
        count["MinValue"].as_i64().unwrap() >= 2,
        "budget = count - 1 >= 1"
    );
    assert_eq!(count["Default"].as_i64(), Some(4), "3 tries by default");

    // Abandoned multipart uploads are cleaned up.
    let rules = resources["ResultsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        .as_array()
        .unwrap();
    assert!(rules.iter().any(|r| {
        r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
            .as_i64()
            .is_some()
    }));

    // The worker role allows exactly the calls the README lists.
    let statements =
        resources["WorkerRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap();
    let actions: BTreeSet<&str> = statements
        .iter()
        .flat_map(|s| match &s["Action"] {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>(),
            Value::String(one) => vec![one.as_str()],
            _ => vec![],
        })
        .collect();
    let expected: BTreeSet<&str> = [
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
        "sqs:SendMessage",
        "s3:PutObject",
        "s3:GetObject",
        "s3:AbortMultipartUpload",
        "s3:ListBucket",
        "autoscaling:SetInstanceProtection",
        "autoscaling:SetInstanceHealth",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:CompleteLifecycleAction",
    ]
    .into();
    assert_eq!(actions, expected);
    assert!(
        statements.iter().all(|s| s["Resource"] != "*"),
        "no wildcard resources"
    );

    // Scaling tracks (visible + in flight) / in-service instances.
    let spec = &resources["BacklogPerInstanceScaling"]["Properties"]["TargetTrackingConfiguration"]
        ["CustomizedMetricSpecification"];
    let metrics = spec["Metrics"].as_array().unwrap();
    let names: BTreeSet<&str> = metrics
        .iter()
        .filter_map(|m| m["MetricStat"]["Metric"]["MetricName"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesVisible",
            "GroupInServiceInstances"
        ]
        .into()
    );
    let expression = metrics
        .iter()
        .find_map(|m| m["Expression"].as_str())
        .unwrap();
    assert!(
        expression.contains("visible + inflight") && expression.contains("instances"),
        "{expression}"
    );

    // Spot over several GPU types, capacity-optimized; a termination hook.
    let group = &resources["WorkerGroup"]["Properties"];
    let mixed = &group["MixedInstancesPolicy"];
    assert_eq!(
        mixed["InstancesDistribution"]["SpotAllocationStrategy"],
        "capacity-optimized"
    );
    assert_eq!(
        mixed["LaunchTemplate"]["Overrides"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        group["LifecycleHookSpecificationList"][0]["LifecycleTransition"],
        "autoscaling:EC2_INSTANCE_TERMINATING"
    );
    assert_eq!(
        resources["DeadLetterAlarm"]["Type"],
        "AWS::CloudWatch::Alarm"
    );
    // Bad parameters are refused by the template itself.
    assert!(t["Parameters"]["InstanceType1"]["AllowedPattern"].is_string());
    assert_eq!(
        t["Parameters"]["BacklogPerInstance"]["MinValue"].as_i64(),
        Some(1)
    );
}

/// The config the launch template writes, as deploy/workers.toml has it.
fn installed_config() -> String {
    let t = template();
    let user_data = t["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
        ["Fn::Base64"]["Fn::Sub"]
        .as_str()
        .unwrap()
        .to_owned();
    let start = user_data.find("[queue_manager]").unwrap();
    let end = user_data.find("EOF\nsystemctl").unwrap();
    user_data[start..end].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_workers_toml_checks_out_against_moto() {
    let repo_copy = std::fs::read_to_string(repo_path("deploy/workers.toml")).unwrap();
    let body = &repo_copy[repo_copy.find("[queue_manager]").unwrap()..];
    let installed = installed_config();
    // Lines as TOML reads them: comments and blank lines do not count.
    let squash = |s: &str| {
        s.lines()
            .map(|l| l.split(" #").next().unwrap_or(l).trim())
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        squash(body),
        squash(&installed),
        "deploy/workers.toml matches what the stack installs"
    );
    assert!(
        installed.contains("run_as = \"renderq-job\"")
            && template().to_string().contains("useradd --system --user-group --no-create-home --shell /usr/sbin/nologin renderq-job"),
        "the stack makes a job user and runs jobs as it"
    );

    let moto = Moto::shared();
    let endpoint = moto.endpoint();
    let aws = Aws::create(&endpoint, 3).await;
    let events = aws
        .sqs
        .create_queue()
        .queue_name(format!("{}-events", aws.bucket))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let config = installed
        .replace("${FleetName}", "renderq")
        .replace("${DrainSeconds}", "300")
        .replace("${JobQueue}", &aws.queue_url)
        .replace("${ResultsBucket}", &aws.bucket)
        .replace("${EventQueue}", &events)
        .replace("${AWS::Region}", "us-east-1")
        .replace("/var/lib/renderq/work", &work.display().to_string())
        // The user the stack's user data makes; this machine need not have
        // it, and `uid:gid` resolves without the user database.
        .replace("run_as = \"renderq-job\"", "run_as = \"65534:65534\"")
        .replace(
            "region = \"us-east-1\"",
            &format!("region = \"us-east-1\"\nendpoint_url = \"{endpoint}\""),
        );
    assert!(
        !config.contains("${"),
        "every stack value filled in:\n{config}"
    );
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, config).unwrap();
    crate::harness::renderq_ok(&["check-config"], &path, &AWS_ENV);
}

/// The template created as a stack on moto's CloudFormation and read back,
/// resource by resource, through each service's own API
/// (`tests/fixtures/cfn_stack.py`).
fn created_stack(endpoint: &str) -> Value {
    let out = std::process::Command::new("python3")
        .arg(repo_path("tests/fixtures/cfn_stack.py"))
        .arg(endpoint)
        .arg(repo_path("deploy/cloudformation/renderq-fleet.yaml"))
        .envs(AWS_ENV)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "cfn_stack.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cfn_stack.py printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What moto 5.2.5 leaves out of the stack (README, "Running a fleet"). It
/// is pinned, so that a moto that creates it fails here and the check can
/// become the real one.
fn moto_does_not_model(what: &str, actual: &Value, as_moto_leaves_it: Value) {
    assert_eq!(
        actual, &as_moto_leaves_it,
        "moto now models {what}: check it here as the template has it, and update the README"
    );
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v}"))
}

#[test]
fn the_stack_is_created_on_moto() {
    let moto = Moto::shared();
    let s = created_stack(&moto.endpoint());
    let stack = &s["stack"];
    assert_eq!(stack["status"], "CREATE_COMPLETE", "{stack}");
    let fleet = str_of(&stack["fleet"], "fleet");
    let outputs = &stack["outputs"];

    // The queues: the job queue redrives to the dead-letter queue after 4
    // receives (the parameter's default: renderq's 3 tries, plus one).
    let queues = &s["queues"];
    let (jobs, dlq, events) = (&queues["jobs"], &queues["dead_letter"], &queues["events"]);
    assert_eq!(jobs["name"], format!("{fleet}-jobs"));
    let redrive = &jobs["redrive_policy"];
    assert_eq!(redrive["maxReceiveCount"], 4, "{jobs}");
    assert_eq!(redrive["deadLetterTargetArn"], dlq["arn"], "{jobs}");
    assert_eq!(jobs["visibility_timeout"], 120);
    assert_eq!(jobs["receive_wait_seconds"], 20);
    assert_eq!(dlq["name"], format!("{fleet}-jobs-dlq"));
    assert_eq!(dlq["retention_seconds"], 1_209_600, "14 days");
    assert_eq!(dlq["redrive_policy"], Value::Null);
    assert_eq!(events["name"], format!("{fleet}-events"));
    assert_eq!(events["redrive_policy"], Value::Null);
    for (output, queue) in [
        ("JobQueueUrl", jobs),
        ("DeadLetterQueueUrl", dlq),
        ("EventQueueUrl", events),
    ] {
        let url = str_of(&outputs[output], output);
        assert!(
            url.ends_with(&format!("/{}", str_of(&queue["name"], "queue name"))),
            "{output} = {url}"
        );
    }

    // The bucket, named after the account and region, encrypted at rest.
    let bucket = &s["bucket"];
    let bucket_name = str_of(&bucket["name"], "bucket name");
    assert_eq!(
        bucket_name,
        format!("{fleet}-results-123456789012-us-east-1")
    );
    assert_eq!(outputs["ResultsBucketName"], bucket_name);
    assert_eq!(bucket["encryption"], serde_json::json!(["AES256"]));
    // moto's AWS::S3::Bucket takes BucketEncryption and Tags only; the
    // abort-multipart and ledger-expiry rules (checked in the template by
    // the_template_creates_what_the_readme_says) are not applied.
    moto_does_not_model(
        "the bucket's LifecycleConfiguration",
        &bucket["lifecycle_rules"],
        Value::Null,
    );
    moto_does_not_model(
        "the bucket's PublicAccessBlockConfiguration",
        &bucket["public_access_block"],
        Value::Null,
    );

    // The roles, their policies on the resources as created.
    let roles = &s["roles"];
    assert_eq!(outputs["SubmitterRoleArn"], roles["SubmitterRole"]["arn"]);
    let statements = |role: &str, policy: &str| -> Vec<Value> {
        roles[role]["policies"][policy]["Statement"]
            .as_array()
            .unwrap_or_else(|| panic!("{role} has no inline policy {policy}: {roles}"))
            .clone()
    };
    let resource_of = |statements: &[Value], sid: &str| -> Value {
        statements
            .iter()
            .find(|st| st["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"))["Resource"]
            .clone()
    };
    let worker = statements("WorkerRole", "renderq-worker");
    let queue_arns = serde_json::json!([jobs["arn"], dlq["arn"]]);
    assert_eq!(resource_of(&worker, "JobQueue"), queue_arns);
    assert_eq!(resource_of(&worker, "Events"), events["arn"]);
    assert_eq!(
        resource_of(&worker, "Results"),
        format!("arn:aws:s3:::{bucket_name}/*")
    );
    assert_eq!(
        resource_of(&worker, "ResultsBucket"),
        format!("arn:aws:s3:::{bucket_name}")
    );
    let own = resource_of(&worker, "OwnInstance");
    assert!(
        str_of(&own, "OwnInstance").ends_with(&format!(":autoScalingGroupName/{fleet}-workers")),
        "{own}"
    );
    let submitter = statements("SubmitterRole", "renderq-submitter");
    assert_eq!(resource_of(&submitter, "Submit"), queue_arns);

    // The launch template: the prerequisite AMI, the worker's instance
    // profile, IMDSv2 only, and user data with the stack's values filled in.
    let lt = &s["launch_template"];
    assert_eq!(lt["name"], format!("{fleet}-worker"));
    assert_eq!(lt["image_id"], s["prerequisites"]["image_id"]);
    let profiles = roles["WorkerRole"]["instance_profiles"].as_array().unwrap();
    assert!(profiles.contains(&lt["instance_profile_arn"]), "{lt}");
    assert_eq!(lt["metadata_options"]["HttpTokens"], "required");
    let user_data = str_of(&lt["user_data"], "user data");
    let (job_url, event_url) = (&outputs["JobQueueUrl"], &outputs["EventQueueUrl"]);
    for line in [
        format!("url = \"{}\"", str_of(job_url, "JobQueueUrl")),
        format!("url = \"{}\"", str_of(event_url, "EventQueueUrl")),
        format!("bucket = \"{bucket_name}\""),
        format!("group = \"{fleet}-workers\""),
        format!("lifecycle_hook = \"{fleet}-drain\""),
        "drain_timeout = \"300s\"".to_owned(),
        "region = \"us-east-1\"".to_owned(),
    ] {
        assert!(
            user_data.lines().any(|l| l == line),
            "user data lacks {line}:\n{user_data}"
        );
    }
    assert!(!user_data.contains("${"), "left unfilled:\n{user_data}");

    // The group: spot only over three GPU types, capacity-optimized, from
    // the launch template as created, in the prerequisite subnets; empty.
    let group = &s["group"];
    assert_eq!(group["name"], format!("{fleet}-workers"));
    assert_eq!(outputs["WorkerGroupName"], group["name"]);
    assert_eq!(group["min_size"], 0);
    assert_eq!(group["max_size"], 10);
    assert_eq!(group["instances"], 0);
    assert_eq!(group["subnets"], s["prerequisites"]["subnets"]);
    let mixed = &group["mixed_instances_policy"];
    let spec = &mixed["LaunchTemplate"]["LaunchTemplateSpecification"];
    assert_eq!(spec["LaunchTemplateId"], lt["id"], "{mixed}");
    assert_eq!(spec["Version"], lt["latest_version"].to_string());
    let types: Vec<&str> = mixed["LaunchTemplate"]["Overrides"]
        .as_array()
        .unwrap_or_else(|| panic!("no overrides: {mixed}"))
        .iter()
        .map(|o| str_of(&o["InstanceType"], "InstanceType"))
        .collect();
    assert_eq!(types, ["g5.xlarge", "g4dn.xlarge", "g6.xlarge"]);
    let distribution = &mixed["InstancesDistribution"];
    assert_eq!(distribution["SpotAllocationStrategy"], "capacity-optimized");
    assert_eq!(distribution["OnDemandBaseCapacity"], 0);
    assert_eq!(distribution["OnDemandPercentageAboveBaseCapacity"], 0);
    // moto's AWS::AutoScaling::AutoScalingGroup drops CapacityRebalance and
    // LifecycleHookSpecificationList: the termination hook (checked in the
    // template) is not created.
    moto_does_not_model(
        "the group's CapacityRebalance",
        &group["capacity_rebalance"],
        false.into(),
    );
    moto_does_not_model(
        "the group's LifecycleHookSpecificationList",
        &s["lifecycle_hooks"],
        serde_json::json!([]),
    );

    // Resource types moto's CloudFormation skips (with a warning, the stack
    // still CREATE_COMPLETE): the target-tracking policy and the alarm.
    moto_does_not_model(
        "AWS::AutoScaling::ScalingPolicy and AWS::CloudWatch::Alarm",
        &s["not_created"],
        serde_json::json!({
            "BacklogPerInstanceScaling": "AWS::AutoScaling::ScalingPolicy",
            "DeadLetterAlarm": "AWS::CloudWatch::Alarm",
        }),
    );
    assert_eq!(s["scaling_policies"], serde_json::json!([]));
    assert_eq!(s["alarms"], serde_json::json!([]));
}
