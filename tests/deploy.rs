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
